"""Models that Dynamo splits into many graphs, offloaded whole: transformers' Qwen2.5-VL vision
tower and a synthetic stack with a data-dependent ``.item()`` in every block. Compiled with
``offload_inductor`` they compute what the same model compiled with plain Inductor computes, every
graph copies in what it reads (nothing is left to eager code over the bus), and each graph a model
is split into is rewritten."""

import functools
import re

import pytest
import torch
from torch._dynamo.utils import counters

import fx_offload
from fx_offload import runtime
from tests.graph_break_models import ItemStack, vision_tower

pytest.importorskip("transformers")


def _compiled(model, inputs, backend: str, calls: int = 2) -> tuple[list, int, int]:
    """Outputs of ``calls`` compiled calls, and the graphs and graph breaks Dynamo made."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        outs = [compiled(*inputs) for _ in range(calls)]
    return outs, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _check(model, inputs, patterns, offloaded, reference) -> tuple[int, int]:
    """Offload ``model`` with ``patterns``, compile it with ``offload_inductor``, compare two calls
    with ``reference`` (plain Inductor's outputs, graphs and breaks); return the graphs and breaks."""
    expected, graphs, breaks = reference
    plan = offloaded(model, patterns)
    before = runtime.copied_bytes
    outs, offload_graphs, offload_breaks = _compiled(model, inputs, "offload_inductor")
    for out in outs:
        for got, want in zip(_tensors(out), _tensors(expected[0])):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (offload_graphs, offload_breaks) == (graphs, breaks)  # the pass adds no break
    assert plan.outside_graphs() == []  # every offloaded weight was read inside a compiled graph
    assert runtime.copied_bytes > before
    return graphs, breaks


def _tensors(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


@functools.cache
def _vision_reference() -> tuple[list, int, int]:
    model, inputs = vision_tower("tiny")
    return _compiled(model, inputs, "inductor", calls=1)


@pytest.mark.parametrize("policy", ["stream", "swap"])
def test_qwen2_5_vl_vision_tower_offloaded_equals_inductor(policy, offloaded):
    model, inputs = vision_tower("tiny")
    graphs, breaks = _check(model, inputs, {"visual": policy}, offloaded, _vision_reference())
    # transformers' tower breaks the graph in every block (data-dependent shapes): with 2 blocks,
    # 13 graphs and 11 breaks under transformers 5.19
    assert graphs >= 2 * 2 and breaks >= 2 * 2


@pytest.mark.parametrize("policy", ["stream", "swap"])
def test_a_stack_breaking_at_item_in_every_block_offloaded_equals_inductor(policy, offloaded):
    torch.manual_seed(0)
    model = ItemStack(n=4).eval()
    inputs = (torch.randn(3, 8),)
    reference = _compiled(model, inputs, "inductor", calls=1)
    graphs, breaks = _check(model, inputs, {"layers": policy}, offloaded, reference)
    # a break in every block, but Dynamo compiles the block's graphs once and reuses them for all
    # four blocks (with each block's weights): fewer graphs than two per block
    assert breaks >= 1 and 2 <= graphs < 2 * 4


# Dynamo reuses a compiled graph wherever its guards pass, and they check a parameter's type, not
# which model or component it belongs to: swapped and streamed parameters have classes of their own.
def test_two_models_with_other_policies_each_run_their_own(offloaded):
    from tests.models import BreakingStack, seeded

    swapped, streamed = seeded(BreakingStack), seeded(BreakingStack)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = swapped(x)
    plan = offloaded(swapped, {"layers": "swap"})
    offloaded(streamed, {"layers": "stream"})
    with torch.no_grad():
        first = torch.compile(swapped, backend="offload_inductor")(x)
        second = torch.compile(streamed, backend="offload_inductor")(x)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert all(c.swap_ins == 1 for c in plan.components)


def test_a_graph_reused_across_swapped_components_reads_each_one(offloaded):
    from tests.models import BreakingStack, seeded

    model = seeded(BreakingStack)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    plan = offloaded(model, {f"layers.{i}": "swap" for i in range(4)})
    compiled = torch.compile(model, backend="offload_inductor")
    with torch.no_grad():
        outs = [compiled(x) for _ in range(2)]
    for out in outs:
        torch.testing.assert_close(out, expected)
    assert all(c.swap_ins >= 1 for c in plan.components)


def _origins(compiled, inputs, warm: int = 2, calls: int = 2) -> dict[str, int]:
    """The runtime's head-copy counters over ``calls`` forwards after ``warm`` ones."""
    with torch.no_grad():
        for _ in range(warm):
            compiled(*inputs)
        counters["fx_offload"].clear()
        for _ in range(calls):
            compiled(*inputs)
    return {k: v for k, v in counters["fx_offload"].items() if k.startswith(("head_copy", "cross_graph"))}


@pytest.mark.parametrize("model_name", ["item_stack", "vision_tower"])
def test_after_the_first_forwards_every_head_copy_was_issued_before_its_call(model_name, offloaded):
    """The runtime learns the order of the calls across graph breaks: once learned, every call of a
    graph with heads finds them filled by a copy issued after the call before it (of the same
    graph, another graph, or the last forward), none when it began."""
    import gc

    gc.collect()  # the graphs of earlier tests go, and with them what the call sequence learned
    if model_name == "item_stack":
        torch.manual_seed(0)
        model, inputs, patterns = ItemStack(n=4).eval(), (torch.randn(3, 8),), {"layers": "stream"}
    else:
        model, inputs = vision_tower("tiny")
        patterns = {"visual": "stream"}
    with torch.no_grad():
        expected = model(*inputs)
    offloaded(model, patterns)
    compiled = torch.compile(model, backend="offload_inductor")
    origins = _origins(compiled, inputs)
    calls = sum(
        origins.get(f"head_copy_{o}", 0) for o in ("previous_graph", "same_graph", "between_forwards")
    )
    assert origins.get("head_copy_not_predicted", 0) == 0, origins
    assert calls >= 2 * 4, origins  # at least two graphs with heads per block, two forwards
    forward = runtime.last_forward()
    assert "not predicted: 0" in forward, forward
    # a call is counted as copied after another graph's call only where that call prefetched it
    assert origins.get("head_copy_previous_graph", 0) <= origins.get("cross_graph_prefetches", 0), origins
    # graphs by Dynamo's compile ids, as in the logs; weights by the module holding them
    block = "layers" if model_name == "item_stack" else r"visual\.blocks"
    assert re.search(rf"graph \[\d+/\d+(_\d+)?\]  {block}\.\d+\S* \(\d+ weights\)", forward), forward
    with torch.no_grad():
        for got, want in zip(_tensors(compiled(*inputs)), _tensors(expected)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


class _Skipping(ItemStack):
    """``ItemStack`` whose forward may skip a block: another path through the same graphs."""

    def forward(self, x: torch.Tensor, skip: int = -1) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i != skip:
                x = layer(x)
        return x


@pytest.mark.parametrize("policy", ["stream", "swap"])
def test_wrong_guesses_cost_copies_not_correctness(policy, offloaded):
    """Paths that change from forward to forward (a block skipped, another input shape) make the
    learned order guess wrong; every output still equals the plain model's."""
    torch.manual_seed(0)
    plain, model = _Skipping(n=4).eval(), _Skipping(n=4).eval()
    model.load_state_dict(plain.state_dict())
    offloaded(model, {"layers": policy})
    compiled = torch.compile(model, backend="offload_inductor")
    cases = [(torch.randn(3, 8), -1), (torch.randn(3, 8), 1), (torch.randn(5, 8), -1), (torch.randn(3, 8), 2)]
    counters["fx_offload"].clear()
    with torch.no_grad():
        for k in range(3 * len(cases)):
            x, skip = cases[k % len(cases)] if k < 2 * len(cases) else cases[-(k % len(cases)) - 1]
            torch.testing.assert_close(compiled(x, skip), plain(x, skip), rtol=0, atol=1e-5, msg=f"call {k}")
            if k == 4:  # a write between calls: the heads that hold the old value are copied again
                with torch.no_grad():
                    for p, q in ((plain.layers[2].fc1.weight, model.layers[2].fc1.weight),):
                        p.mul_(0.5)
                        q.mul_(0.5)
    if policy == "stream":
        assert counters["fx_offload"]["head_copy_not_predicted"] > 0  # the guesses were wrong at times


def test_a_norm_that_a_graph_break_leaves_alone_is_a_plain_graph_call(offloaded):
    """Transformers' tower breaks the graph right after each block's first norm: streamed, the norm's
    weight would be a graph call with a head of its own (a copy and a wrapper per block). Kept on
    the device (``keep_vectors``) that graph reads no offloaded weight, and the calls with heads are
    fewer; the outputs are the same."""
    counts = {}
    for keep in (0, 0.05):
        model, inputs = vision_tower("tiny")
        offloaded(model, {"visual": "stream"}, keep_vectors=keep)
        compiled = torch.compile(model, backend="offload_inductor")
        origins = _origins(compiled, inputs, calls=1)
        counts[keep] = sum(v for k, v in origins.items() if k.startswith("head_copy"))
        forward = runtime.last_forward()
        assert (".norm1 (" in forward) == (keep == 0), forward
        with torch.no_grad():
            for got, want in zip(_tensors(compiled(*inputs)), _tensors(_vision_reference()[0][0])):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        fx_offload.restore(model)
        torch._dynamo.reset()
    assert counts[0.05] < counts[0], counts
