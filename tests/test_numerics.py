"""The compiled offloaded model computes what the same model computes without offload."""

import pytest
import torch

from fx_offload.explain import recording
from tests.models import BmmReads, BreakingStack, Broken, CalledTwice, LazyReads, Nested, Stack, Tied, seeded

CASES = {
    "nested_visual": (Nested, ["visual"], lambda: (torch.randn(3, 8),)),
    "layer_stack": (Stack, ["layers.*"], lambda: (torch.randn(3, 8),)),
    "called_twice": (CalledTwice, ["shared"], lambda: (torch.randn(3, 8),)),
    "tied": (Tied, ["embed"], lambda: (torch.randint(0, 16, (2, 5)),)),
    "graph_break": (Broken, ["first", "second"], lambda: (torch.randn(3, 8),)),
    "everything": (Stack, ["*"], lambda: (torch.randn(3, 8),)),
    # one graph per block kind after a break: first-traced block offloaded, then resident
    "reused_graph_even": (BreakingStack, ["re:layers\\.[02]"], lambda: (torch.randn(3, 8),)),
    "reused_graph_odd": (BreakingStack, ["re:layers\\.[13]"], lambda: (torch.randn(3, 8),)),
    # a norm's output read again after its block's release, by an op Inductor may inline it into
    "lazy_reads": (LazyReads, ["blocks.*"], lambda: (torch.randn(3, 8),)),
}


def _run(model, backend, inputs, **kwargs):
    with torch.no_grad():
        return torch.compile(model, backend=backend, **kwargs)(*inputs)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_twin_equals_model_without_offload_exactly(case, prefetch, offloaded):
    cls, patterns, make_inputs = CASES[case]
    model = seeded(cls)
    inputs = make_inputs()
    with torch.no_grad():
        expected = model(*inputs)
    offloaded(model, patterns)
    out = _run(model, "offload_eager", inputs, options={"prefetch": prefetch})
    assert torch.equal(out, expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_inductor_equals_inductor_without_offload_and_eager(case, offloaded):
    cls, patterns, make_inputs = CASES[case]
    model = seeded(cls)
    inputs = make_inputs()
    with torch.no_grad():
        eager = model(*inputs)
    plain = _run(model, "inductor", inputs)
    torch._dynamo.reset()
    offloaded(model, patterns)
    with recording(lambda gm, plan, regions: (gm.code, regions)) as graphs:
        out = _run(model, "offload_inductor", inputs)
    assert graphs, "the offload pass did not run inside Inductor"
    for code, regions in graphs:  # each region fetched (or a head op) and released, or passed
        assert regions and code.count("fx_offload.release") == sum(not r.passed for r in regions), code
    assert torch.equal(out, plain)  # the pass moves data, never changes arithmetic
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("passed", [True, False])
def test_inductor_fetches_exactly_the_offloaded_parameters(offloaded, passed):
    model = seeded(Nested)
    offloaded(model, ["visual"])
    with recording() as graphs:
        _run(model, "offload_inductor", (torch.randn(2, 8),), options={"heads_as_inputs": passed})
    (text,) = graphs
    named = {line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("# arg")}
    assert named == {n for n, _ in model.named_parameters() if n.startswith("thinker.visual.")}
    if passed:  # the head's weights are the graph's inputs, the wrapper passes its buffers there
        (head,) = [line for line in text.splitlines() if "head buffers passed as inputs (" in line]
        arguments = head.split("inputs (", 1)[1].rstrip(")").split(", ")
        assert "fx_offload.head" not in text
    else:
        (head,) = [line for line in text.splitlines() if "fx_offload.head.default(" in line]
        arguments = head.split("head.default([", 1)[1].split("]", 1)[0].split(", ")
    assert len(arguments) == len(named)


def test_second_call_with_new_values_is_not_stale(offloaded):
    model = seeded(Stack)
    offloaded(model, ["layers.*"])
    compiled = torch.compile(model, backend="offload_inductor")
    for _ in range(2):
        x = torch.randn(3, 8)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), _reference(model, x), rtol=1e-5, atol=1e-6)


def test_fullgraph_dynamic_shapes_and_recompiles(offloaded):
    model = seeded(Stack)
    offloaded(model, ["layers.*"])
    compiled = torch.compile(model, backend="offload_eager", fullgraph=True, dynamic=True)
    with recording() as graphs:
        for rows in (2, 5, 9):
            x = torch.randn(rows, 8)
            with torch.no_grad():
                assert torch.equal(compiled(x), _reference(model, x))
        x = torch.randn(4, 8, dtype=torch.float64)  # a dtype guard fails: Dynamo recompiles
        model.double()
    assert len(graphs) == 1  # one dynamic graph served every row count


def test_recompile_rewrites_again(offloaded):
    model = seeded(Stack)
    offloaded(model, ["layers.*"])
    options = {"prefetch": 2, "prefetch_head": 1}
    compiled = torch.compile(model, backend="offload_eager", dynamic=False, options=options)
    with recording() as graphs, torch.no_grad():
        compiled(torch.randn(2, 8))
        compiled(torch.randn(2, 8))
        compiled(torch.randn(5, 8))
    assert len(graphs) == 2
    for g in graphs:  # two regions fetched, and the head, whose buffers are passed as inputs
        assert g.count("fx_offload.fetch.default(") == 2 and g.count("head buffers passed as inputs") == 1


def test_mode_and_prefetch_options_are_accepted_on_cpu(offloaded):
    model = seeded(Nested)
    x = torch.randn(2, 8)
    expected = _reference(model, x)
    offloaded(model, ["visual"])
    out = _run(model, "offload_inductor", (x,), mode="reduce-overhead")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    out = _run(model, "offload_inductor", (x,), options={"prefetch": 2})
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def _reference(model, x):
    """The same model's output computed in eager mode (offloaded parameters read in place)."""
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize(
    "cls,patterns,shape",
    [(BmmReads, ["block"], (3, 1, 2)), (LazyReads, ["blocks.*"], (3, 8))],
    ids=["bmm", "lazy_reads"],
)
def test_reads_inlined_into_later_kernels_run_before_the_release(cls, patterns, shape, offloaded):
    """A read of a weight that Inductor inlines into a consumer used after the block (a one-row
    ``bmm`` lowered to multiply and sum) still runs before the block's release: released buffers
    are poisoned, and without heads no refill rewrites them, so a late read shows as NaN."""
    model = seeded(cls)
    inputs = (torch.randn(*shape),)
    plain = _run(model, "inductor", inputs)
    torch._dynamo.reset()
    offloaded(model, patterns)
    out = _run(model, "offload_inductor", inputs, options={"prefetch_head": False})
    assert torch.equal(out, plain)
