"""The head: each compiled graph's first region, served from persistent buffers refilled for the
next call (by the graph's wrapper when the call returns, after the point the graph marks), and
filled again by the wrapper when a call passes other weights or their values changed in place."""

import pytest
import torch

from fx_offload import runtime
from tests.models import BreakingStack, Stack, seeded


def _compiled(model, backend, **options):
    return torch.compile(model, backend=backend, options=options)


@pytest.mark.parametrize("head", [True, False])
def test_every_call_copies_every_offloaded_byte_once(head, offloaded):
    model = seeded(Stack, n=4)
    plan = offloaded(model, ["layers.*"])
    compiled = _compiled(model, "offload_eager", prefetch_head=head)
    x = torch.randn(3, 8)
    with torch.no_grad():
        compiled(x)
        before = runtime.copied_bytes
        compiled(x)
        compiled(x)
    assert runtime.copied_bytes - before == 2 * plan.offloaded_bytes


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
def test_weights_written_in_place_are_read_at_the_next_call(backend, offloaded):
    model = seeded(Stack, n=4)
    x = torch.randn(3, 8)
    offloaded(model, ["layers.*"])
    compiled = _compiled(model, backend)
    with torch.no_grad():
        compiled(x)
        for layer in model.layers:  # layers.0 is the head, refilled at the end of that call
            layer.fc1.weight.mul_(0.5)
        out = compiled(x)
    plain = seeded(Stack, n=4)
    with torch.no_grad():
        for layer in plain.layers:
            layer.fc1.weight.mul_(0.5)
        expected = plain(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
def test_a_graph_reused_for_every_block_keeps_one_set_of_head_buffers(backend, offloaded):
    """BreakingStack breaks the graph inside each block, so Dynamo reuses its graphs for every
    block, each call with other weights: the heads hold one block's worth, not the whole stack."""
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


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
def test_the_wrapper_refills_the_head_once_per_call_after_the_graph(backend, offloaded, monkeypatch):
    """Under its wrapper a graph's ``refill`` only marks where the refill may start; the wrapper
    copies when the call has returned, so a call ends without waiting for the next call's head."""
    model = seeded(Stack, n=4)
    offloaded(model, ["layers.*"])
    compiled = _compiled(model, backend)
    events = []
    monkeypatch.setattr(runtime, "_refill_after", lambda found: events.append(("refill", found.records)))
    original = runtime.refill

    def refill(*args):
        events.append(("graph",))
        original(*args)

    monkeypatch.setattr(runtime, "refill", refill)
    x = torch.randn(3, 8)
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
    assert [e[0] for e in events] == ["graph", "refill"] * 3, events
    names = [record.names for record in events[1][1]]
    assert names and all(name[0].startswith("layers.0.") for name in names), names


@pytest.mark.parametrize("bad", [2, "true", None])
def test_prefetch_head_must_be_a_bool(bad, offloaded):
    model = seeded(Stack)
    offloaded(model, ["layers.*"])
    with pytest.raises(Exception, match="prefetch_head"):
        with torch.no_grad():
            _compiled(model, "offload_eager", prefetch_head=bad)(torch.randn(2, 8))
