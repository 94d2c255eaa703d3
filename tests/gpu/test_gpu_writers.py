"""On a CUDA device: writers that bypass the version counter (fused optimizers) and in-place
writes inside a compiled forward, against the plain model.

Skipped without CUDA. Run on the GPU machine with ``python -m pytest -q tests/gpu``.
"""

import pytest
import torch

import fx_offload
from tests.models import SelfWriting, Stack, seeded

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("policy", ["stream", "swap"])
@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.SGD], ids=["adamw", "sgd"])
def test_fused_optimizer_steps_on_cuda_are_seen(policy, optimizer):
    plain, model = seeded(Stack).cuda().train(), seeded(Stack).cuda().train()
    fx_offload.offload(model, ["layers.*"], policy=policy)
    compiled = torch.compile(model, backend="offload_inductor", options={"prefetch_head": 1})
    runs = [(plain, plain, optimizer(plain.parameters(), lr=0.05, fused=True))]
    runs.append((model, compiled, optimizer(model.parameters(), lr=0.05, fused=True)))
    losses = {id(m): [] for m, _, _ in runs}
    torch.manual_seed(3)
    inputs = [torch.randn(4, 8, device="cuda") for _ in range(4)]
    try:
        for m, call, opt in runs:
            for x in inputs:
                loss = call(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses[id(m)].append(loss.item())
        torch.testing.assert_close(losses[id(model)], losses[id(plain)], rtol=1e-4, atol=1e-5)
    finally:
        fx_offload.restore(model)


@pytest.mark.parametrize("policy", ["stream", "swap"])
def test_in_place_writes_inside_forward_reach_the_parameter_on_cuda(policy):
    plain, model = seeded(SelfWriting).cuda(), seeded(SelfWriting).cuda()
    fx_offload.offload(model, ["body"], policy=policy)
    compiled = torch.compile(model, backend="offload_inductor")
    x = torch.randn(3, 8, device="cuda")
    try:
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(compiled(x), plain(x), rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(plain.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    finally:
        fx_offload.restore(model)


def test_in_place_writes_inside_forward_under_cuda_graphs_raise_naming_the_parameter():
    model = seeded(SelfWriting).cuda()
    fx_offload.offload(model, ["body"])
    compiled = torch.compile(model, backend="offload_inductor", mode="reduce-overhead")
    try:
        with pytest.raises(Exception, match="'body.scale' in place.*without CUDA graphs"), torch.no_grad():
            compiled(torch.randn(3, 8, device="cuda"))
    finally:
        fx_offload.restore(model)
