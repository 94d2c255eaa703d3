"""On a CUDA device: ``swap`` under CUDA graphs across switches, and the memory that offloading
the towers of a real multimodal model saves. Skipped without CUDA."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import fx_offload
from fx_offload import swap
from tests.gpu.test_gpu import TOLERANCE, _Recordings
from tests.models import Stack, TwoStage, seeded

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _param_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_keeps_cuda_graphs_valid_across_switches(dtype):
    model = seeded(TwoStage, dim=256, hidden=1024).to("cuda", dtype)
    inputs = [torch.randn(16, 256, device="cuda", dtype=dtype) for _ in range(5)]
    expected = []
    with torch.no_grad():
        for x in inputs:
            steps = [model.think(x)]
            for _ in range(3):
                steps.append(model.talk(steps[-1]))
            expected.append(steps)
    resident = torch.cuda.memory_allocated()
    plan = fx_offload.offload(model, ["thinker", "talker"], policy="swap")
    try:
        # the arena holds one stage: the other's bytes left the device
        assert torch.cuda.memory_allocated() <= resident - min(c.nbytes for c in plan.components) + 4096
        think = torch.compile(model.think, backend="offload_inductor", mode="reduce-overhead")
        talk = torch.compile(model.talk, backend="offload_inductor", mode="reduce-overhead")
        outs, recorded = [], None
        with _Recordings() as graphs, torch.no_grad():
            for i, x in enumerate(inputs):
                steps = [think(x).clone()]
                for _ in range(3):
                    steps.append(talk(steps[-1]).clone())
                outs.append(steps)
                if i == 1:
                    recorded = graphs.records
        assert graphs.skips == 0, "Inductor skipped CUDA graphs"
        assert recorded >= 2 and graphs.records == recorded, "re-recorded after a switch"
        for got, want in zip(outs, expected):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, **TOLERANCE[dtype])
        assert {c.name: c.swap_ins for c in plan.components} == {"thinker": 5, "talker": 5}
    finally:
        fx_offload.restore(model)


def test_training_through_stages_that_take_turns_gives_the_plain_models_gradients():
    """With one stage on the device at a time, the talker's swap-in overwrites the thinker's range
    before the thinker's backward: the forward saves the parameters (read over the bus by the
    backward), not the range."""
    model = seeded(TwoStage, dim=256, hidden=1024).to("cuda")
    reference = seeded(TwoStage, dim=256, hidden=1024).to("cuda")
    plan = fx_offload.offload(model, ["thinker", "talker"], policy="swap")
    try:
        think = torch.compile(model.think, backend="offload_inductor")
        talk = torch.compile(model.talk, backend="offload_inductor")
        for _ in range(2):
            x = torch.randn(16, 256, device="cuda")
            loss = talk(think(x)).square().mean()
            expected = reference.talk(reference.think(x)).square().mean()
            torch.testing.assert_close(loss, expected, **TOLERANCE[torch.float32])
            loss.backward()
            expected.backward()
            for (name, param), ours in zip(reference.named_parameters(), model.parameters()):
                torch.testing.assert_close(ours.grad, param.grad, **TOLERANCE[torch.float32], msg=name)
        assert [c.swap_ins for c in plan.components] == [2, 2]
    finally:
        fx_offload.restore(model)


class _TwoStacks(nn.Module):
    """Two stacks whose blocks Dynamo splits into graphs of their own (as transformers' towers
    are), with ``probe`` called between them."""

    def __init__(self, n: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.first, self.second = Stack(n, dim, hidden), Stack(n, dim, hidden)
        self.probe = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stack in (self.first, self.second):
            for layer in stack.layers:
                x = layer(x)
                self.probe()
            x = stack.out(x)
        return x


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_a_swap_in_lands_in_pieces_and_each_graph_waits_for_its_own(mode, monkeypatch):
    monkeypatch.setattr(swap, "PIECE", 1 << 20)  # each 4 MiB matrix a piece: two per block
    model = seeded(_TwoStacks, n=6, dim=512, hidden=2048).cuda()
    inputs = [torch.randn(64, 512, device="cuda") for _ in range(4)]
    model.probe = lambda: None
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    plan = fx_offload.offload(model, ["first", "second"], policy="swap")  # one stack at a time
    landing = []
    model.probe = torch._dynamo.disable(lambda: landing.append(sum(len(c.landing) for c in plan.components)))
    try:
        compiled = torch.compile(model, backend="offload_inductor", mode=mode)
        with torch.no_grad():
            for _ in range(2):
                for x, want in zip(inputs, expected):
                    landing.clear()
                    torch.cuda._sleep(50_000_000)  # the compute stream runs late: the copies wait
                    torch.testing.assert_close(compiled(x), want, **TOLERANCE[torch.float32])
        assert {c.name: c.swap_ins for c in plan.components} == {"first": 8, "second": 8}
        # after each stack's first block, the rest of that stack is still landing: that block
        # waited for its own pieces, not for the whole stack; each later block for a few more
        first, second = landing[:6], landing[6:]
        assert first[0] >= 8 and second[0] >= 8, landing
        assert first == sorted(first, reverse=True) and second == sorted(second, reverse=True), landing
        assert first[-1] <= 1 and second[-1] <= 1, landing  # the stack's ``out`` may still land
    finally:
        fx_offload.restore(model)


def _omni_example():
    path = Path(__file__).parents[2] / "examples" / "qwen_omni.py"
    spec = importlib.util.spec_from_file_location("qwen_omni_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("policy", ["stream", "swap"])
def test_offloaded_towers_lower_peak_memory_by_their_bytes(policy):
    pytest.importorskip("transformers")
    example = _omni_example()
    # towers big enough that their bytes dominate the activations
    example.VISION["test"] = dict(example.VISION["tiny"], depth=4, hidden_size=512, intermediate_size=2048)
    example.AUDIO["test"] = dict(example.AUDIO["tiny"], d_model=512, encoder_layers=4, encoder_ffn_dim=2048)
    example.TEXT["test"], example.TALKER["test"] = example.TEXT["tiny"], example.TALKER["tiny"]
    example.PROMPT["test"] = example.PROMPT["tiny"]
    device = torch.device("cuda")
    model, inputs = example.build("test", device, torch.float32)
    towers = [model.thinker.visual, model.thinker.audio_tower]
    tower_bytes = sum(_param_bytes(t) for t in towers)
    with torch.no_grad():
        expected = model.think(inputs)[0].float()
    patterns = {"visual": policy, "audio_tower": policy}
    rows = {}
    for name, chosen in (("resident", None), ("offloaded", patterns)):
        row = example.run_setting(model, inputs, expected, device, name, chosen, runs=2)
        torch.testing.assert_close(row["max_abs_diff"], 0.0, atol=2e-3, rtol=0)
        rows[name] = row
    saved = (rows["resident"]["peak_gb"] - rows["offloaded"]["peak_gb"]) * 1e9
    if policy == "stream":
        # at most prefetch + 1 regions on the device, heads included: the persistent heads plus
        # at most three fetched regions (no heads: prefetch 2); a region is one block here
        largest_block = max(_param_bytes(b) for t in towers for b in t.modules() if b is not t and
                            type(b).__name__.endswith(("VisionBlock", "EncoderLayer")))  # fmt: skip
        allowed = 3 * largest_block + rows['offloaded']['persistent_gb'] * 1e9 + (tower_bytes - sum(
            _param_bytes(b) for t in towers for b in t.modules()
            if type(b).__name__.endswith(("VisionBlock", "EncoderLayer"))))  # fmt: skip
    else:  # the arena holds the larger tower
        allowed = max(_param_bytes(t) for t in towers) + (1 << 20)
    assert saved >= tower_bytes - allowed, (saved, tower_bytes, allowed)
