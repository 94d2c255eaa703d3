"""A video processor for model directories that take images and audio, not videos.

transformers' Qwen2-VL video processor needs torchvision; the processors of Qwen2.5-VL and
Qwen2.5-Omni still load one. A model directory names this class in
``video_preprocessor_config.json`` (``auto_map``; load with ``trust_remote_code=True``).
"""

from transformers.video_processing_utils import BaseVideoProcessor


class ImagesOnlyVideoProcessor(BaseVideoProcessor):
    merge_size = 2
    temporal_patch_size = 2
    patch_size = 14

    def __init__(self, **kwargs) -> None:
        # BaseVideoProcessor's own setup needs torchvision; this one keeps its settings only
        for key, value in kwargs.items():
            setattr(self, key, value)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "ImagesOnlyVideoProcessor":
        return cls()

    def __call__(self, *args, **kwargs):
        raise ValueError("this model directory takes images and audio, not videos")
