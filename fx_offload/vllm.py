"""The vLLM hookup: the offload pass as a vLLM ``InductorPass``, and the config that installs it.

vLLM builds and loads the model itself, so nobody calls ``fx_offload.offload`` on it. The pass
does the placing when it first sees a graph: it maps each placeholder's fake tensor back to the
real tensor (through the fake storage the fake mode's converter made from it), selects the
weights read inside modules that the patterns match (names as the compiled graph spells them,
relative to the module vLLM compiles: ``layers.0.mlp``), places them in pinned host memory, and
rewrites the graph as the core pass does. Parameters that vLLM itself placed in pinned memory
(``--cpu-offload-gb``, ``--cpu-offload-params``: marked ``_vllm_is_uva_offloaded``) are adopted
too: their in-place reads over the bus become prefetched bulk copies.

    from vllm import LLM
    import fx_offload.vllm
    llm = LLM(model, compilation_config=fx_offload.vllm.compilation_config(["mlp"]))

For ``vllm serve --compilation-config '{"inductor_passes": {"post_grad_custom_post_pass":
"fx_offload.vllm_pass"}}'`` the pass reads its patterns from the environment variable
``FX_OFFLOAD_VLLM`` (JSON: ``{"patterns": ["mlp"], "prefetch": 1}``); without it, it adopts only
what vLLM's own offload flags placed.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch._guards import detect_fake_mode
from vllm.compilation.passes.inductor_pass import InductorPass

from fx_offload import backend, matching, placement
from fx_offload.options import AUTO, Options
from fx_offload.regions import GraphPlan, module_calls, module_name

ENVIRONMENT = "FX_OFFLOAD_VLLM"


class OffloadPass(InductorPass):
    """fx_offload's rewrite as a vLLM post-grad pass.

    Args:
        patterns: fx_offload patterns on module names as the compiled graph has them
            (``layers.*.mlp``, ``mlp``, ``re:layers\\.[0-3]``); ``None`` adopts only the
            parameters vLLM's own offload flags placed.
        prefetch: at most ``prefetch + 1`` regions' weights on the device at once, heads included.
        prefetch_head: how many of each graph's first regions are refilled during the previous
            call (True: one). Off by default here: it is verified under Inductor's CUDA graphs,
            not under vLLM's.
        adopt_vllm_offloaded: also fetch parameters vLLM placed in pinned memory.
    """

    def __init__(
        self,
        patterns: Sequence[str] | None = None,
        *,
        prefetch: int | str = backend.DEFAULT_PREFETCH,
        prefetch_head: bool | int = False,
        adopt_vllm_offloaded: bool = True,
    ) -> None:
        if patterns is not None and "swap" in matching.normalize_policies(patterns, None):
            raise ValueError(
                f"patterns {dict(patterns)!r} ask for policy 'swap', which vLLM cannot run: a swap "
                "happens between compiled calls, and vLLM calls its compiled pieces itself. Use "
                "'stream' (a list of patterns) under vLLM"
            )
        self.patterns = None if patterns is None else matching.normalize_patterns(patterns)
        options = Options(prefetch=prefetch, prefetch_head=prefetch_head)
        self.prefetch_head = 0 if options.prefetch_head == AUTO else options.prefetch_head  # 'auto': off
        self.prefetch = options.prefetch
        if self.prefetch == AUTO:
            self.prefetch = backend.default_prefetch(self.prefetch_head)
        self.adopt_vllm_offloaded = bool(adopt_vllm_offloaded)

    @classmethod
    def from_environment(cls) -> OffloadPass:
        """The pass that ``FX_OFFLOAD_VLLM`` (a JSON object of this class's arguments) describes."""
        text = os.environ.get(ENVIRONMENT, "")
        try:
            config = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(
                f'{ENVIRONMENT} must be a JSON object such as \'{{"patterns": ["mlp"]}}\', '
                f"got {text!r} ({error})"
            ) from None
        if not isinstance(config, dict):
            raise ValueError(f"{ENVIRONMENT} must be a JSON object, got {text!r}")
        return cls(**config)

    def config(self) -> dict:
        return {
            "patterns": list(self.patterns) if self.patterns is not None else None,
            "prefetch": self.prefetch,
            "prefetch_head": self.prefetch_head,
            "adopt_vllm_offloaded": self.adopt_vllm_offloaded,
        }

    def uuid(self) -> str:
        # vLLM caches compiled graphs by this: it changes with the patterns, options and our code
        return backend._digest(json.dumps(self.config(), sort_keys=True)).hex()

    def __call__(self, graph: fx.Graph) -> None:
        plan = self.plan(graph)
        if plan.offloaded_inputs:
            backend._run_pass(graph.owning_module, plan)

    def plan(self, graph: fx.Graph) -> GraphPlan:
        """Place what this graph's patterns select and say which placeholders are offloaded."""
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        reals = _real_tensors(placeholders)
        calls = module_calls(graph)
        roots: set[str] = set()
        if self.patterns is not None:
            names = {""} | {prefix for name in calls.values() for prefix in matching.prefixes(name)}
            # VLLM_COMPILE splits the model at attention and runs this pass per piece
            selected = matching.select(self.patterns, sorted(names), strict=not _piecewise())
            roots = {name for hits in selected.values() for name in hits}

        offloaded: dict[int, str] = {}
        region_modules = {key for key, name in calls.items() if roots and matching.is_within(name, roots)}
        to_place: list[tuple[torch.Tensor, tuple[str, ...]]] = []
        positions: list[int] = []
        for i, (node, real) in enumerate(zip(placeholders, reals)):
            # vLLM's CPU layers repack some weights into plain tensors after loading; per-call
            # inputs have symbolic sizes and were left unmatched by _real_tensors
            if not isinstance(real, torch.Tensor) or real.dim() == 0:
                continue  # a scalar is no weight (vLLM's CPU GEMM handles are int64 scalars)
            users = [_innermost(user) for user in node.users]
            name = f"{users[0][1] if users and users[0] else '?'} {tuple(real.shape)}"
            record = placement.lookup(real)
            if (
                record is None
                and self.adopt_vllm_offloaded
                and getattr(real, "_vllm_is_uva_offloaded", False)
            ):
                record = _adopt(real, name)
                region_modules |= {user[0] for user in users if user}
            if record is not None:
                offloaded[i] = record.names[0]
            elif roots and any(user and matching.is_within(user[1], roots) for user in users):
                to_place.append((real, (name,)))
                positions.append(i)
        if to_place:
            device = to_place[0][0].device
            for i, record in zip(positions, placement.place(to_place, device, None)):
                offloaded[i] = record.names[0]
        device_type = next((placement.lookup(reals[i]).device.type for i in offloaded), "cpu")
        return GraphPlan(offloaded, frozenset(region_modules), self.prefetch, device_type, self.prefetch_head)


def compilation_config(patterns: Sequence[str] | None, *, mode: int | None = None, **options) -> dict:
    """The ``compilation_config`` for ``vllm.LLM`` that runs fx_offload's pass.

    Args:
        patterns: see ``OffloadPass``.
        mode: vLLM's compilation mode; ``None`` keeps vLLM's default (VLLM_COMPILE on GPU,
            DYNAMO_TRACE_ONCE on CPU). Every mode compiles with Inductor, which runs the pass.
        options: ``prefetch``, ``prefetch_head``, ``adopt_vllm_offloaded``.
    """
    config: dict = {
        "inductor_compile_config": {"post_grad_custom_post_pass": OffloadPass(patterns, **options)}
    }
    if mode is not None:
        config["mode"] = mode
        config["backend"] = "inductor"
    return config


def _real_tensors(placeholders: list[fx.Node]) -> list[torch.Tensor | None]:
    """The real tensor behind each placeholder, where the fake mode made its fake from one.

    AOTAutograd gives placeholders fresh fake tensors, views of the ones Dynamo made from the
    real inputs: they share the fake storage, which the fake mode's converter maps back.
    """
    from torch.multiprocessing.reductions import StorageWeakRef

    values = [node.meta.get("val") for node in placeholders]
    fake_mode = detect_fake_mode(values)
    if fake_mode is None:
        return [None] * len(placeholders)
    converter = fake_mode.fake_tensor_converter
    by_storage: dict[StorageWeakRef, list[torch.Tensor]] = {}
    for real in list(converter.meta_converter.describer.lookup_tensor.keys()):
        fake = converter._get_memo(real)
        if fake is not None:
            by_storage.setdefault(StorageWeakRef(fake.untyped_storage()), []).append(real)
    found: list[torch.Tensor | None] = []
    for value in values:
        candidates = []
        # parameters have static sizes; comparing a symbolic one would add a shape guard
        if isinstance(value, torch.Tensor) and not _symbolic(value):
            candidates = [
                real
                for real in by_storage.get(StorageWeakRef(value.untyped_storage()), [])
                if real.shape == value.shape
                and real.stride() == value.stride()
                and real.storage_offset() == value.storage_offset()
            ]
        found.append(candidates[0] if len(candidates) == 1 else None)
    return found


def _piecewise() -> bool:
    from vllm.config import CompilationMode, get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    return config is not None and config.compilation_config.mode == CompilationMode.VLLM_COMPILE


def _symbolic(value: torch.Tensor) -> bool:
    return not all(isinstance(d, int) for d in (*value.shape, *value.stride(), value.storage_offset()))


def _innermost(node: fx.Node) -> tuple[str, str] | None:
    stack = list((node.meta.get("nn_module_stack") or {}).items())
    if not stack:
        return None
    key, (path, _cls) = stack[-1]
    return key.split("@")[0], module_name(path)


def _adopt(param: nn.Parameter, name: str) -> placement.HostParameter:
    """Register a parameter vLLM already made a device view of pinned memory."""
    nbytes = param.numel() * param.element_size()
    buffer = (ctypes.c_uint8 * nbytes).from_address(param.data_ptr())
    host = torch.frombuffer(buffer, dtype=torch.uint8).view(param.dtype).view(param.shape)
    return placement.adopt(param, host, (name,))
