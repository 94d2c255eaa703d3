"""Models that Dynamo splits into many graphs: transformers' Qwen2.5-VL vision tower (random
weights, from a config) and a synthetic stack whose blocks each break the graph at a
data-dependent ``.item()``. Shared by the tests and ``benchmarks/bench_graph_breaks.py``."""

from __future__ import annotations

import torch
from torch import nn

# Qwen2.5-VL's vision tower; the 3B and 7B models share the ViT and differ in the merger's output
# (the language model's width)
VL_VISION = {
    "tiny": dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        fullatt_block_indexes=[1], window_size=56,
    ),
    "3B": dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
        fullatt_block_indexes=[7, 15, 23, 31], window_size=112,
    ),
    "7B": dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
        fullatt_block_indexes=[7, 15, 23, 31], window_size=112,
    ),
}  # fmt: skip
# image patch grid (t, h, w): 16 patches (4 merged tokens) tiny, 1024 patches (256 tokens) full
VL_GRID = {"tiny": (1, 4, 4), "3B": (1, 32, 32), "7B": (1, 32, 32)}


class VisionTower(nn.Module):
    """Qwen2.5-VL's vision tower as ``visual`` (the name patterns select), returning its merged
    image features (``pooler_output``) and the hidden states before the merger."""

    def __init__(self, size: str = "tiny") -> None:
        super().__init__()
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

        config = modeling_qwen2_5_vl.Qwen2_5_VLVisionConfig(
            **VL_VISION[size], patch_size=14, spatial_merge_size=2, temporal_patch_size=2
        )
        self.visual = modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel(config)

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.visual(pixel_values, grid_thw=grid_thw)
        return out.pooler_output, out.last_hidden_state


def vision_tower(
    size: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[VisionTower, tuple[torch.Tensor, torch.Tensor]]:
    """A Qwen2.5-VL vision tower of ``size`` (``tiny``, ``3B``, ``7B``) with random weights (seed
    0) and one image's inputs for it."""
    if size not in VL_VISION:
        raise ValueError(f"size must be one of {sorted(VL_VISION)}, got {size!r}")
    torch.manual_seed(0)
    with torch.device(device):
        model = VisionTower(size).to(dtype).eval()
    t, h, w = VL_GRID[size]
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, device=device, dtype=dtype)
    return model, (pixels, torch.tensor([[t, h, w]], device=device))


class ItemBlock(nn.Module):
    """A block that breaks the graph at a data-dependent ``.item()`` between its two layers, as
    transformers' towers do (``.tolist()``, ``.item()``): two graphs per block, each reused by
    every block of the stack with that block's weights."""

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        scale = 1.0 + h.abs().amax().item()  # a graph break (scalar outputs are not captured)
        return x + self.fc2(h / scale)


class ItemStack(nn.Module):
    """``n`` ``ItemBlock``s. (A module called beside the loop, in the frame that holds it, would
    run outside any compiled graph: Dynamo leaves a frame with a break inside its loop to Python.)"""

    def __init__(self, n: int = 4, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ItemBlock(dim, hidden) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
