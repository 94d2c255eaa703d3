"""diffusers' Flux transformer (tiny, random weights), its blocks offloaded and compiled: the
model whose double-stream blocks Inductor reads in another order than Dynamo (see
``test_head.py``), run as ``examples/diffusers_offload.py`` runs it."""

import sys
from pathlib import Path

import pytest
import torch

from fx_offload import runtime

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import diffusers_offload  # noqa: E402


@pytest.mark.parametrize("every", [1, 2])
def test_flux_denoises_as_without_offload_with_its_heads_served(every, offloaded):
    cpu = torch.device("cpu")
    model = diffusers_offload.flux(False, cpu, torch.float32)
    step = diffusers_offload.inputs(model, False, cpu, torch.float32)
    expected, _ = diffusers_offload.denoise(model, step, 3, cpu)
    names = diffusers_offload.block_patterns(model, every)
    offloaded(model, names)
    compiled = torch.compile(model, backend="offload_inductor")
    got, _ = diffusers_offload.denoise(compiled, step, 3, cpu)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not runtime.device_runtime(cpu).loose_heads
    assert runtime.persistent_bytes() > 0
