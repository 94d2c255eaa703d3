"""Regions served ahead (``prefetch_head`` as a count): persistent buffers that the compiled
function's wrapper fills before every call, so the copies overlap the launch of the graph."""

import pytest
import torch
import torch.fx as fx

from fx_offload import runtime
from fx_offload.explain import recording
from fx_offload.regions import GraphPlan, Region
from fx_offload.rewrite import head_count
from tests.models import BreakingStack, Broken, Stack, seeded


def _compiled(model, backend, **options):
    return torch.compile(model, backend=backend, options=options)


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
@pytest.mark.parametrize("head", [2, 3, 4])
def test_ahead_regions_compute_what_the_model_computes(backend, head, offloaded):
    model = seeded(Stack, n=4)
    inputs = [torch.randn(3, 8) for _ in range(3)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    offloaded(model, ["layers.*"])
    compiled = _compiled(model, backend, prefetch_head=head, prefetch=1)
    with recording() as graphs, torch.no_grad():
        outs = [compiled(x) for x in inputs]
    for out, ref in zip(outs, expected):
        if backend == "offload_eager":
            assert torch.equal(out, ref)
        else:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (graph,) = graphs
    assert graph.count("fx_offload.head.default(") == 1
    assert graph.count("fx_offload.ahead.default(") == head - 1
    assert graph.count("fx_offload.hold.default(") == head - 1
    assert graph.count("fx_offload.fetch.default(") == 4 - head


def test_every_call_copies_every_offloaded_byte_once(offloaded):
    """The wrapper copies the ahead regions before each call; nothing is copied twice or skipped."""
    model = seeded(Stack, n=4)
    plan = offloaded(model, ["layers.*"])
    compiled = _compiled(model, "offload_eager", prefetch_head=3)
    x = torch.randn(3, 8)
    with torch.no_grad():
        compiled(x)
        before = runtime.copied_bytes
        compiled(x)
        compiled(x)
    assert runtime.copied_bytes - before == 2 * plan.offloaded_bytes


def test_weights_written_in_place_are_read_at_the_next_call(offloaded):
    model = seeded(Stack, n=4)
    x = torch.randn(3, 8)
    offloaded(model, ["layers.*"])
    compiled = _compiled(model, "offload_inductor", prefetch_head=3)
    with torch.no_grad():
        compiled(x)
        for layer in model.layers:  # region 1 and 2 are served ahead, 0 by the head, 3 fetched
            layer.fc1.weight.mul_(0.5)
        out = compiled(x)
    plain = seeded(Stack, n=4)
    with torch.no_grad():
        for layer in plain.layers:
            layer.fc1.weight.mul_(0.5)
        expected = plain(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_a_graph_with_a_barrier_gets_no_ahead_regions(offloaded):
    """Broken splits into graphs; each is rewritten on its own, with as many regions as it has."""
    model = seeded(Broken)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    offloaded(model, ["first", "second"])
    with recording() as graphs, torch.no_grad():
        out = _compiled(model, "offload_eager", prefetch_head=5)(x)
    assert torch.equal(out, expected)
    assert graphs and all("fx_offload.ahead" not in g for g in graphs)  # one region per graph


@pytest.mark.parametrize("bad", [-1, "3", 1.5])
def test_prefetch_head_must_be_a_bool_or_a_count(bad, offloaded):
    model = seeded(Stack)
    offloaded(model, ["layers.*"])
    with pytest.raises(Exception, match="prefetch_head"):
        with torch.no_grad():
            _compiled(model, "offload_eager", prefetch_head=bad)(torch.randn(2, 8))


def _regions(sizes: list[int]) -> list[Region]:
    graph = fx.Graph()
    regions = []
    for i, numel in enumerate(sizes):
        node = graph.placeholder(f"w{i}")
        node.meta["val"] = torch.empty(numel, dtype=torch.bfloat16, device="meta")
        regions.append(Region(f"k{i}", f"layers.{i}", [node]))
    return regions


def test_head_count_is_the_first_region_by_default_or_the_count_asked():
    regions = _regions([1 << 20] * 8)
    assert head_count(regions, GraphPlan({}, prefetch=2, device_type="cuda")) == 1
    assert head_count(regions, GraphPlan({}, prefetch_head=False, device_type="cuda")) == 0
    assert head_count(regions, GraphPlan({}, prefetch_head=5, device_type="cpu")) == 5
    assert head_count(regions[:2], GraphPlan({}, prefetch_head=5)) == 2


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
def test_a_graph_reused_for_every_block_keeps_one_set_of_persistent_buffers(backend, offloaded):
    """BreakingStack breaks the graph inside each block, so Dynamo reuses one graph for every
    block, each call with other weights: the head is one block's worth, not the whole stack."""
    model = seeded(BreakingStack, n=4)
    inputs = [torch.randn(3, 8) for _ in range(3)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    plan = offloaded(model, ["layers.*"])
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        outs = [compiled(x) for x in inputs]
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    block = plan.offloaded_bytes // 4
    assert 0 < runtime.persistent_bytes() <= block, (runtime.persistent_bytes(), block)
