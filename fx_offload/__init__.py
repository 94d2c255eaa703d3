"""fx_offload: run a PyTorch model with part of its weights in host memory, as a compiler pass.

``offload(model, patterns)`` places the matched modules' parameters in pinned host memory;
``torch.compile(model, backend="offload_inductor")`` fetches them in the compiled graph.
"""

from fx_offload import ops as _ops  # noqa: F401  (registers the fx_offload:: custom ops)
from fx_offload import writers as _writers  # noqa: F401  (sees fused optimizers' writes)
from fx_offload.backend import offload_eager, offload_inductor
from fx_offload.explain import explain
from fx_offload.options import AUTO, OffloadOptionError, Options
from fx_offload.plan import OffloadPlan, offload, plan_of, restore

__all__ = [
    "AUTO",
    "OffloadOptionError",
    "OffloadPlan",
    "Options",
    "explain",
    "offload",
    "offload_eager",
    "offload_inductor",
    "plan_of",
    "restore",
]
__version__ = "0.1.0"

if "vllm" in __import__("sys").modules:
    # vLLM resolves the JSON form's "fx_offload.vllm_pass" through this package's namespace
    from fx_offload.vllm import OffloadPass as _VllmOffloadPass

    vllm_pass = _VllmOffloadPass.from_environment()
