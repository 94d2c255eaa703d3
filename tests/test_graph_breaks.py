"""Models that Dynamo splits into many graphs, offloaded whole: transformers' Qwen2.5-VL vision
tower and a synthetic stack with a data-dependent ``.item()`` in every block. Compiled with
``offload_inductor`` they compute what the same model compiled with plain Inductor computes, every
graph copies in what it reads (nothing is left to eager code over the bus), and each graph a model
is split into is rewritten."""

import functools

import pytest
import torch
from torch._dynamo.utils import counters

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
