"""The head: each compiled graph's first region, served from persistent buffers refilled for the
next call (by the graph's wrapper when the call returns, after all the call queued), and
filled again by the wrapper when a call passes other weights or their values changed in place."""

import gc
import math
import threading
from unittest import mock

import pytest
import torch

import fx_offload
from fx_offload import placement, runtime
from tests.models import (
    BreakingStack,
    CalledTwice,
    CrossedTowers,
    HalvesStack,
    RootReadFirst,
    ShapeReadFirst,
    Stack,
    Tied,
    TwoStream,
    seeded,
)


def _compiled(model, backend, **options):
    return torch.compile(model, backend=backend, options=options)


def _copied_per_call(compiled, x, calls=3):
    """The last output of ``calls`` calls, and the bytes each call copied host to device."""
    copied = []
    for _ in range(calls):
        before = runtime.bytes_copied()
        out = compiled(x)
        copied.append(runtime.bytes_copied() - before)
    return out, copied


@pytest.mark.parametrize("head", [True, False, 2, 4])
@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
def test_every_call_copies_every_offloaded_byte_its_heads_do_not_hold_already(backend, head, offloaded):
    """The first call copies every offloaded byte once; a later call of the same graph with the
    same weights, unchanged, copies all but its heads' bytes: their buffers still hold them (a write
    in place is seen, below)."""
    model = seeded(Stack, n=4)
    plan = offloaded(model, ["layers.*"])
    compiled = _compiled(model, backend, prefetch_head=head)
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = runtime.bytes_copied()
        compiled(x)
        assert runtime.bytes_copied() - before == plan.offloaded_bytes
        held = runtime.persistent_bytes()
        assert (held > 0) == (head is not False)
        before = runtime.bytes_copied()
        compiled(x)
        compiled(x)
        assert runtime.bytes_copied() - before == 2 * (plan.offloaded_bytes - held)
        written = model.layers[0].fc1.weight
        written.mul_(2)  # in the first head (if any): that head is copied again, once
        record = placement.lookup(written)
        first = sum(h.nbytes for h in runtime.live_heads() if record in h.records)
        before = runtime.bytes_copied()
        out = compiled(x)
        compiled(x)
        assert runtime.bytes_copied() - before == 2 * (plan.offloaded_bytes - held) + first
        torch.testing.assert_close(out, _restored_output(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", [True, 2])
@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
def test_weights_written_in_place_are_read_at_the_next_call(backend, head, offloaded):
    model = seeded(Stack, n=4)
    x = torch.randn(3, 8)
    offloaded(model, ["layers.*"])
    compiled = _compiled(model, backend, prefetch_head=head)
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
@pytest.mark.parametrize("head", [1, 2])
def test_the_wrapper_refills_the_head_once_per_call_after_the_graph(backend, head, offloaded, monkeypatch):
    """Under its wrapper a graph's ``refill`` copies nothing; the wrapper copies when the call has
    returned (head regions in order), so a call ends without waiting for the next call's head."""
    model = seeded(Stack, n=4)
    offloaded(model, ["layers.*"])
    compiled = _compiled(model, backend, prefetch_head=head, heads_as_inputs=False)
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
    assert [e[0] for e in events] == (["graph"] * head + ["refill"] * head) * 3, events
    for i, (_, records) in enumerate(events[head : 2 * head]):
        names = [record.names[0] for record in records]
        assert names and all(name.startswith(f"layers.{i}.") for name in names), names


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
@pytest.mark.parametrize("head", [1, 2])
def test_heads_passed_as_inputs_need_no_op_and_are_refilled_after_the_call(
    backend, head, offloaded, monkeypatch
):
    """Without CUDA graphs the wrapper passes the heads' buffers as the graph's inputs: the graph
    has no head, wait, refill, join or release for them; the wrapper refills them, one set of
    buffers, once per call, after it, where they do not hold these values already; every byte
    the heads do not hold crosses once per call; values and in-place
    writes between calls are as without offload."""
    model = seeded(Stack, n=4)
    heads_bytes = sum(p.nbytes for layer in model.layers[:head] for p in layer.parameters())
    plan = offloaded(model, ["layers.*"])
    graphs = []
    fx_offload.backend.listeners.append(lambda gm, plan, regions: graphs.append((gm.code, regions)))
    try:
        compiled = _compiled(model, backend, prefetch_head=head)
        refills = []
        original = runtime._refill_after

        def refill_after(found):
            refills.append([record.names[0] for record in found.records])
            original(found)

        monkeypatch.setattr(runtime, "_refill_after", refill_after)
        x = torch.randn(3, 8)
        with torch.no_grad():
            out, copied = _copied_per_call(compiled, x)
            torch.testing.assert_close(out, _restored_output(model, x), rtol=1e-5, atol=1e-6)
            for layer in model.layers:
                layer.fc2.weight.mul_(0.5)
            out = compiled(x)
    finally:
        fx_offload.backend.listeners.pop()
    torch.testing.assert_close(out, _restored_output(model, x), rtol=1e-5, atol=1e-6)
    ((code, regions),) = graphs
    assert [r.passed for r in regions] == [True] * head + [False] * (4 - head)
    for op in ("head", "refill", "join"):
        assert f"fx_offload.{op}" not in code, code
    assert code.count("fx_offload.fetch") == code.count("fx_offload.release") == 4 - head, code
    # the heads are one set of buffers, refilled at once after each call: the first head's weights first
    assert [names[0].split(".")[1] for names in refills] == ["0"] * 4, refills
    assert {name.split(".")[1] for name in refills[0]} == {str(i) for i in range(head)}, refills
    assert copied == [plan.offloaded_bytes] + [plan.offloaded_bytes - heads_bytes] * 2, copied


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
@pytest.mark.parametrize(("head", "in_graph", "split"), [
    (1, 700, [700]),  # a cut inside layers.0.fc2.weight (its 31st element)
    (2, 1500, [1120, 380]),  # all of layers.0, then into layers.1
    (2, 1 << 20, [1120, 1120]),  # more than the heads hold
    (2, None, [1120, 1120]),  # the default: all of it
    (2, "auto", [1120, 1120]),
    (2, 0, [0, 0]),  # all after the call
])  # fmt: skip
def test_the_graph_copies_the_first_refill_in_graph_bytes_and_the_wrapper_the_rest(
    backend, head, in_graph, split, offloaded
):
    """Each head's refill copies its share of ``refill_in_graph`` bytes inside the call, the
    wrapper the rest after it: every byte crosses once per call, the heads hold every value for
    the next call whatever they held before (garbage here), and the next call reads in-place
    changes (the fill before a call copies the whole head again)."""
    model = seeded(Stack, n=4)
    x = torch.randn(3, 8)
    plan = offloaded(model, ["layers.*"])
    options = {} if in_graph is None else {"refill_in_graph": in_graph}
    compiled = _compiled(model, backend, prefetch_head=head, heads_as_inputs=False, **options)
    with torch.no_grad():
        out, copied = _copied_per_call(compiled, x)
        torch.testing.assert_close(out, _restored_output(model, x), rtol=1e-5, atol=1e-6)
        assert [found.in_graph for found in runtime.live_heads()] == split
        assert copied[1:] == [plan.offloaded_bytes] * 2, (copied, plan.offloaded_bytes)
        for found in runtime.live_heads():
            for buffer in found.buffers:
                buffer.fill_(float("nan"))
        compiled(x)  # reads the garbage, then refills both parts for the next call
        torch.testing.assert_close(compiled(x), out)
        for layer in model.layers:
            layer.fc2.weight.mul_(0.5)
        out = compiled(x)
    torch.testing.assert_close(out, _restored_output(model, x), rtol=1e-5, atol=1e-6)


def _restored_output(model, x):
    """The output of a resident copy of ``model`` with its current values."""
    plain = seeded(type(model), n=4)
    plain.load_state_dict(model.state_dict())
    return plain(x)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8MiB"])
def test_refill_in_graph_must_be_a_byte_count_or_auto(bad, offloaded):
    model = seeded(Stack)
    offloaded(model, ["layers.*"])
    with pytest.raises(Exception, match=r"refill_in_graph.*must be an int >= 0"):
        with torch.no_grad():
            _compiled(model, "offload_eager", refill_in_graph=bad)(torch.randn(2, 8))


@pytest.mark.parametrize("window", [{"prefetch_head": False}, {"prefetch_head": 0}, {"prefetch": 1}])
def test_refill_in_graph_without_a_head_is_refused(window, offloaded):
    model = seeded(Stack)
    offloaded(model, ["layers.*"])
    with pytest.raises(Exception, match=r"refill_in_graph.*leaves no head"):
        with torch.no_grad():
            _compiled(model, "offload_eager", refill_in_graph=1024, **window)(torch.randn(2, 8))


@pytest.mark.parametrize("head", [1, 2, 3])
def test_the_head_holds_as_many_regions_as_asked_between_calls(head, offloaded):
    model = seeded(Stack, n=4)
    plan = offloaded(model, ["layers.*"])
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        out = _compiled(model, "offload_inductor", prefetch_head=head)(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert runtime.persistent_bytes() == head * plan.offloaded_bytes // 4


@pytest.mark.parametrize("head", [1, 2])
def test_the_head_serves_its_region_when_inductor_reads_its_weights_in_another_order(head, offloaded):
    """The graph's ``head`` and the wrapper agree on the order of a head's weights whatever order
    Inductor's graph reads them in: no region falls back to a persistent copy of its own (made
    during a CUDA graph tree's warm-up, such a copy lands in its pool, which refuses it)."""
    model = seeded(TwoStream)
    plan = offloaded(model, ["blocks.*"])
    x, c = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x, c)
        compiled = _compiled(model, "offload_inductor", prefetch_head=head)
        compiled(x, c)
        out = compiled(x, c)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not runtime.device_runtime(torch.device("cpu")).loose_heads
    assert runtime.persistent_bytes() == head * plan.offloaded_bytes // 3


@pytest.mark.parametrize("head", [1, 2])
def test_the_heads_are_the_regions_dynamo_runs_first_wherever_inductor_runs_them(head, offloaded):
    """The wrapper holds buffers for the regions that Dynamo's graph runs first; Inductor's graph
    runs the towers the other way round, and still serves those regions from them."""
    model = seeded(CrossedTowers)
    offloaded(model, ["a", "b", "out"])
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x, y)
        compiled = _compiled(model, "offload_inductor", prefetch_head=head)
        compiled(x, y)
        before = runtime.bytes_copied()
        out = compiled(x, y)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not runtime.device_runtime(torch.device("cpu")).loose_heads
    heads = [model.a, model.b][:head]
    assert runtime.persistent_bytes() == sum(p.nbytes for m in heads for p in m.parameters())
    # the heads hold their weights from the call before: the rest crosses
    offloaded_bytes = sum(p.nbytes for p in model.parameters())
    assert runtime.bytes_copied() - before == offloaded_bytes - runtime.persistent_bytes()


@pytest.mark.parametrize("cls", [ShapeReadFirst, RootReadFirst])
def test_the_head_is_the_one_declared_when_inductors_graph_reads_it_otherwise(cls, offloaded):
    """ShapeReadFirst: Inductor's graph no longer reads one of the head's weights; RootReadFirst:
    the head region belongs to no module, and its name differs between the graphs. Each head is
    still served from the wrapper's buffers, which hold all of its weights."""
    model = seeded(cls)
    offloaded(model, ["a", "b"])
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        compiled = _compiled(model, "offload_inductor", prefetch_head=1)
        compiled(x)
        out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not runtime.device_runtime(torch.device("cpu")).loose_heads
    assert runtime.persistent_bytes() > 0


@pytest.mark.parametrize("options", [{}, {"refill_in_graph": 100}])
@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
def test_a_reused_graph_refills_its_head_with_the_block_that_comes_next(backend, options, offloaded):
    """Dynamo reuses BreakingStack's block graphs for every block: after a call, the refill loads
    the block that followed last time, so from the third forward on (the second still learns
    which block follows which) every byte crosses once per forward (refilling the same block
    again would copy each head twice), and stays correct. The graph would copy, inside the call,
    the first bytes of the block it runs, but the next call runs the next block: once it has run
    other weights it copies nothing in the call, and the wrapper the next block's head whole."""
    model = seeded(BreakingStack, n=4)
    inputs = [torch.randn(3, 8) for _ in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    plan = offloaded(model, ["layers.*"])
    compiled = torch.compile(model, backend=backend, options=options)
    copied, outs = [], []
    with torch.no_grad():
        for x in inputs:
            before = runtime.bytes_copied()
            outs.append(compiled(x))
            copied.append(runtime.bytes_copied() - before)
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    reused = [found for found in runtime.live_heads() if found.successor]
    assert reused and all(found.in_graph == 0 for found in reused)
    assert copied[2:] == [plan.offloaded_bytes] * 2, (copied, plan.offloaded_bytes)


def test_a_store_copies_a_blocks_weights_as_it_did_before_until_they_are_placed_again(offloaded):
    """The refill after each call of a graph reused for every block copies as it did the last time
    it loaded that block, without looking up records, runs or views again, and notes the versions
    the weights had when a call last passed them (the head's ``ran``), reading no parameter: a
    write in place since moves the versions the next call reads, which copies again. A parameter
    placed or given back anywhere (``placement.generation``) makes the store find them again."""
    model, compiled, x, head = _reused_head(offloaded)
    store = head.store
    with torch.no_grad():
        assert len(store.made) == 4, store.made  # one per block
        pointers = next(iter(store.made))
        buffers, hosts = store.copies_of(pointers)
        assert [b.nbytes for b in buffers] == [h.nbytes for h in hosts]
        assert sum(b.nbytes for b in buffers) <= store.nbytes
        weights = [placement.at(pointer).param() for pointer in pointers]
        assert head.ran[pointers] == tuple(w._version for w in weights)
        weights[0].mul_(2)
        assert head.ran[pointers] != tuple(w._version for w in weights)
        for _ in range(2):
            out = compiled(x)
        torch.testing.assert_close(out, _restored_output(model, x), rtol=1e-5, atol=1e-6)
        assert head.ran[pointers] == tuple(w._version for w in weights)
    fx_offload.restore(model)
    assert store.copies_of(pointers) is None


def test_the_addresses_of_a_calls_head_weights_are_one_tuple_from_call_to_call(offloaded):
    """A head's tuple of its weights' addresses is made once and passed on to every later call
    with those weights: the tables keyed by it (the head's successors and versions, the call
    sequence) find it by identity instead of comparing address after address."""
    head = _reused_head(offloaded)[3]
    keys = list(head.ran)
    assert len(keys) == 4  # one per block
    assert any(head.current is key for key in keys)  # the last call's, made by the first
    for following in head.successor.values():
        assert any(following is key for key in keys)


def _reused_head(offloaded) -> tuple:
    """A ``BreakingStack`` offloaded whole, compiled with its heads passed as inputs, after three
    forwards: the model, the compiled model, the input, and the head of the graph Dynamo reuses for
    every block."""
    model = seeded(BreakingStack, n=4)
    offloaded(model, ["layers.*"])
    compiled = _compiled(model, "offload_eager", heads_as_inputs=True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
    reused = [found for found in runtime.live_heads() if found.successor]
    assert reused
    return model, compiled, x, reused[0]


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
@pytest.mark.parametrize("cls", [Stack, BreakingStack])
def test_graphs_compiled_for_two_shapes_share_the_head_buffers_of_their_weights(backend, cls, offloaded):
    """generate() compiles a graph for the prompt and another for the tokens after it, and both
    read the same weights first: their heads share one set of buffers, so those weights take
    device memory once. The buffers hold what the last call left there, and every call still
    reads its own weights' current values, written in place between calls or not. BreakingStack's
    graphs also serve every block in turn, so the shared buffers change blocks between calls."""
    model, plain = seeded(cls, n=4), seeded(cls, n=4)
    offloaded(model, ["layers.*"])
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        for step, x in enumerate([torch.randn(3, 8), torch.randn(5, 8)] * 3):
            if step == 3:
                for layer in [*model.layers, *plain.layers]:
                    layer.fc1.weight.mul_(0.5)
            torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-6)
    heads = runtime.live_heads()
    stores = {id(found.store): found.nbytes for found in heads}
    assert heads and len(stores) * 2 == len(heads), (len(stores), len(heads))
    assert runtime.persistent_bytes() == sum(stores.values()) == sum(h.nbytes for h in heads) // 2


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
def test_a_graph_reads_what_another_graph_left_in_the_shared_head_buffers(backend, offloaded):
    """Two models of one class share Dynamo's graphs: the graph for x serves both, and its head
    buffers are shared with the graph for y, which serves the first model alone. After the second
    model's call, the shared buffers hold its weights, and the graph for y sees that it must
    fill them again with the first model's (what the buffers hold is theirs, not a graph's)."""
    models = [seeded(Stack, n=4, seed=seed) for seed in (0, 1)]
    plains = [seeded(Stack, n=4, seed=seed) for seed in (0, 1)]
    compiled = []
    for model in models:
        offloaded(model, ["layers.*"])
        compiled.append(torch.compile(model, backend=backend, dynamic=False))
    x, y = torch.randn(3, 8), torch.randn(5, 8)
    with torch.no_grad():
        for which, inputs in [(0, x), (0, y), (1, x), (0, y), (1, y), (0, x)]:
            got = compiled[which](inputs)
            torch.testing.assert_close(got, plains[which](inputs), rtol=1e-5, atol=1e-6)


def test_a_thread_gets_head_buffers_of_its_own_where_another_thread_uses_the_shared_ones(offloaded):
    """The heads of two graphs share buffers, but a thread calling one graph while another thread
    calls the other must not read what that one copies there (another block, other weights)."""
    model, plain = seeded(Stack, n=4), seeded(Stack, n=4)
    offloaded(model, ["layers.*"])
    compiled = torch.compile(model, backend="offload_eager", dynamic=False)
    x, y = torch.randn(3, 8), torch.randn(5, 8)

    def call(inputs, into):
        with torch.no_grad():
            into.append(compiled(inputs))

    outs: list = []
    call(x, outs)  # this thread's graph for x takes the shared buffers
    worker = threading.Thread(target=call, args=(y, outs))
    worker.start()
    worker.join()
    with torch.no_grad():
        for out, inputs in zip(outs, [x, y]):
            torch.testing.assert_close(out, plain(inputs), rtol=1e-5, atol=1e-6)
    heads = runtime.live_heads()  # x's graph's, y's graph's (sharing x's) and the worker's own
    assert len(heads) % 3 == 0 and len({id(found.store) for found in heads}) == 2 * len(heads) // 3


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
@pytest.mark.parametrize("shape", [(3, 8), (5, 8)])
def test_a_model_offloaded_where_a_dropped_one_was_reads_its_own_weights(backend, shape, offloaded):
    """A model dropped without ``restore`` leaves its graphs' head buffers holding its values. A
    model offloaded since at the same addresses, with the same version counters, is not served
    them: by the graph compiled for the first (the same shape) nor by one sharing its buffers."""
    first = seeded(Stack, n=4, seed=0)
    memory = [p.data for p in first.parameters()]  # the next model's weights go where these were
    fx_offload.offload(first, ["layers.*"], device="cpu")  # (not the fixture's: it would keep it)
    with torch.no_grad():
        torch.compile(first, backend=backend, dynamic=False)(torch.randn(3, 8))
    del first
    gc.collect()
    model, plain = seeded(Stack, n=4, seed=1), seeded(Stack, n=4, seed=1)
    with torch.no_grad():
        for param, place in zip(model.parameters(), memory):
            place.copy_(param)
            param.data = place
    offloaded(model, ["layers.*"])
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend, dynamic=False)(x), plain(x))


def test_threads_new_to_graphs_that_share_buffers_never_take_the_same_ones(offloaded):
    """Graphs compiled in a thread that has ended; two new threads then call two models' graphs,
    which share head buffers, side by side: neither reads the other's weights (an ident taken
    over from the ended thread, or two threads claiming a store at once, would let them)."""
    models = [seeded(Stack, n=4, seed=seed) for seed in (0, 1)]
    plains = [seeded(Stack, n=4, seed=seed) for seed in (0, 1)]
    compiled = []
    for model in models:
        offloaded(model, ["layers.*"])
        compiled.append(torch.compile(model, backend="offload_eager", dynamic=False))
    inputs = [torch.randn(3, 8), torch.randn(5, 8)]

    def warm():
        with torch.no_grad():
            for x in inputs:
                compiled[0](x)

    thread = threading.Thread(target=warm)
    thread.start()
    thread.join()
    wrong = []

    def work(which):
        with torch.no_grad():
            for _ in range(200):
                out = compiled[which](inputs[which])
                if not torch.allclose(out, plains[which](inputs[which]), rtol=1e-5, atol=1e-6):
                    wrong.append(which)

    threads = [threading.Thread(target=work, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


@pytest.mark.parametrize("passed", [True, False])
def test_restoring_a_model_keeps_the_heads_of_graphs_it_never_ran(passed, offloaded):
    """Dynamo's graph for y serves two models, its graph for x only the first, and both graphs'
    heads share buffers. Restoring the second model drops the heads of the graph it ran through,
    not of the one it never ran (whose shared buffers once held its weights); heads passed as
    inputs are made again at the next call, sharing the other graph's buffers again."""
    models = [seeded(Stack, n=4, seed=seed) for seed in (0, 1)]
    plain = seeded(Stack, n=4, seed=0)
    device = runtime.device_runtime(torch.device("cpu"))
    earlier = set(device.graphs)  # (graphs an earlier test compiled may outlive dynamo.reset)
    compiled = []
    for model in models:
        offloaded(model, ["layers.*"])
        options = {"heads_as_inputs": passed}
        compiled.append(torch.compile(model, backend="offload_eager", dynamic=False, options=options))
    x, y = torch.randn(3, 8), torch.randn(5, 8)
    with torch.no_grad():
        compiled[0](x), compiled[0](y), compiled[1](y)
        fx_offload.restore(models[1])
        graphs = sorted(set(device.graphs) - earlier, key=lambda g: g.name)
        assert [g.has_heads for g in graphs] == [True, False]  # x's graph, y's graph
        for inputs in (x, y, x):
            torch.testing.assert_close(compiled[0](inputs), plain(inputs), rtol=1e-5, atol=1e-6)
    if passed:  # y's graph made its heads again, sharing x's graph's buffers
        assert graphs[1].has_heads and graphs[0]._first[0].store is graphs[1]._first[0].store


def test_a_thread_takes_no_heads_of_a_graph_only_another_thread_calls(offloaded):
    """The device's call sequence is one for every thread: two threads calling two models in turn
    make each guess that the other's graph comes next. The prefetch that guess starts goes only
    into heads the guessing thread holds: it takes no set of the other's graph (device memory
    held as long as the thread lives), and the other's call still gets the graph's own set."""
    models = [seeded(Stack, n=4, seed=0), seeded(Stack, n=4, dim=16, seed=1)]
    plains = [seeded(Stack, n=4, seed=0), seeded(Stack, n=4, dim=16, seed=1)]
    compiled = []
    for model in models:
        offloaded(model, ["layers.*"])
        compiled.append(torch.compile(model, backend="offload_eager", dynamic=False))
    inputs = [torch.randn(3, 8), torch.randn(2, 16)]

    def warm():  # compiled in a thread that has ended: neither caller holds a set yet
        with torch.no_grad():
            for model, x in zip(compiled, inputs):
                model(x)

    thread = threading.Thread(target=warm)
    thread.start()
    thread.join()
    del thread
    gc.collect()
    before = runtime.persistent_bytes()
    turns, wrong = [threading.Semaphore(1), threading.Semaphore(0)], []

    def work(which):
        with torch.no_grad():
            for _ in range(10):
                turns[which].acquire()
                x = inputs[which]
                if not torch.allclose(compiled[which](x), plains[which](x), atol=1e-5):
                    wrong.append(which)
                turns[1 - which].release()

    threads = [threading.Thread(target=work, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == [] and runtime.persistent_bytes() == before, (wrong, runtime.persistent_bytes(), before)


def test_restore_frees_the_heads_of_graphs_that_held_the_models_weights(offloaded):
    model, other = seeded(BreakingStack, n=4), seeded(Stack, n=2)
    offloaded(model, ["layers.*"])
    plan = offloaded(other, ["layers.*"])
    compiled, compiled_other = (
        _compiled(model, "offload_eager", prefetch_head=1),
        _compiled(other, "offload_eager", prefetch_head=1),
    )
    with torch.no_grad():
        for _ in range(2):
            compiled(torch.randn(3, 8))
            compiled_other(torch.randn(3, 8))
    fx_offload.restore(model)  # the graphs stay alive; the other model's head stays with them
    assert runtime.persistent_bytes() == plan.offloaded_bytes // 2


@pytest.mark.parametrize("anew", [False, True])
def test_passed_heads_dropped_by_restore_are_made_again_at_the_next_call(anew, offloaded):
    """``restore`` frees the heads of the graphs that held the model's weights; offloaded again,
    the model's next call, through the old compiled object or a new ``torch.compile`` (Dynamo
    reuses the graphs), makes new heads: one block's pieces again, every byte copied per call,
    writes read. (A fallback that kept a copy of every weight a piece reads, of every block,
    would hold the whole stack and copy nothing.)"""
    model = seeded(HalvesStack, n=4)
    compiled = _compiled(model, "offload_eager")
    x = torch.randn(3, 8)
    plan = offloaded(model, HALVES)
    with torch.no_grad():
        compiled(x)
        held = runtime.persistent_bytes()
        fx_offload.restore(model)
        assert runtime.persistent_bytes() == 0
        plan = offloaded(model, HALVES)
        if anew:
            compiled = _compiled(model, "offload_eager")
        _, copied = _copied_per_call(compiled, x, calls=4)
        for layer in model.layers:
            layer.d.weight.mul_(0.5)
        out = compiled(x)
    torch.testing.assert_close(out, _restored_output(model, x), rtol=1e-5, atol=1e-6)
    assert held == plan.offloaded_bytes // 4
    assert runtime.persistent_bytes() == held
    assert copied[2:] == [plan.offloaded_bytes] * 2


def test_another_models_call_does_not_make_the_dropped_heads_of_a_restored_model_again(offloaded):
    """The call sequence guesses that the restored model's graph comes next after the other
    model's last call; its prefetch must not make that graph's heads again while it is restored."""
    model, other = seeded(HalvesStack, n=4), seeded(BreakingStack, n=4, seed=1)
    offloaded(model, HALVES)
    offloaded(other, ["layers.*"])
    compiled, compiled_other = _compiled(model, "offload_eager"), _compiled(other, "offload_eager")
    x = torch.randn(3, 8)
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
            compiled_other(x)
        compiled(x)  # learned: the other model's last call is followed by this model's first
        fx_offload.restore(model)
        held = runtime.persistent_bytes()  # the other model's heads
        compiled_other(x)
    assert runtime.persistent_bytes() == held


@pytest.mark.parametrize("bad", ["true", "all", -1, 1.5])
def test_prefetch_head_must_be_a_bool_a_count_or_auto(bad, offloaded):
    model = seeded(Stack)
    offloaded(model, ["layers.*"])
    with pytest.raises(Exception, match="prefetch_head"):
        with torch.no_grad():
            _compiled(model, "offload_eager", prefetch_head=bad)(torch.randn(2, 8))


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
@pytest.mark.parametrize(("cls", "patterns", "make_input"), [
    (CalledTwice, ["shared", "mid"], lambda: torch.randn(3, 8)),
    (Tied, ["embed", "body"], lambda: torch.randint(0, 16, (2, 5))),
])  # fmt: skip
def test_head_regions_that_read_the_same_weights_each_read_their_own_buffers(
    cls, patterns, make_input, backend, offloaded
):
    """A module called twice, or a weight tied to another module's, makes two head regions of the
    same weights; each reads its own buffers (released buffers are poisoned in these tests)."""
    model = seeded(cls)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
    offloaded(model, patterns)
    compiled = _compiled(model, backend, prefetch=3, prefetch_head=3)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)


def test_a_refill_in_graph_given_keeps_the_heads_ops(offloaded):
    """``refill_in_graph`` is a part of the graph's ``refill``: asked for, the heads stay ops even
    where the wrapper could pass their buffers as inputs; ``'auto'`` lets it pass them."""
    model = seeded(Stack, n=4)
    offloaded(model, ["layers.*"])
    seen = []
    fx_offload.backend.listeners.append(lambda gm, plan, regions: seen.append(plan.heads_as_inputs))
    try:
        with torch.no_grad():
            for in_graph in (700, "auto"):
                torch._dynamo.reset()
                compiled = _compiled(model, "offload_eager", prefetch_head=1, refill_in_graph=in_graph)
                compiled(torch.randn(3, 8))
    finally:
        fx_offload.backend.listeners.pop()
    assert seen == [False, True]


@pytest.mark.parametrize(
    ("option", "device", "heads", "regions", "passes"),
    [
        ("auto", "cpu", 1, 4, True),  # a CPU: no copy to hide, the ops' Python saved
        ("auto", "cuda", 1, 4, False),  # the graph's tail would hide part of the refill
        ("auto", "cuda", 2, 2, True),  # every region a head: nothing after them to hide it behind
        (True, "cuda", 1, 4, True),
        (False, "cpu", 2, 2, False),
    ],
)
def test_which_graphs_pass_their_heads_as_inputs(option, device, heads, regions, passes):
    options = fx_offload.Options(heads_as_inputs=option)
    assert fx_offload.backend.pass_heads(options, device, heads, regions) is passes
    if option is not True:  # (True with a refill_in_graph raises: test_options)
        asked = fx_offload.Options(heads_as_inputs=option, refill_in_graph=1024)
        assert fx_offload.backend.pass_heads(asked, device, heads, regions) is False


HALVES = ["layers.*.a", "layers.*.b", "layers.*.c", "layers.*.d"]  # two regions of 288 B per half


@pytest.mark.parametrize(
    ("model_cls", "head_bytes", "options", "heads", "passed"),
    [
        (HalvesStack, None, {}, 2, True),  # one block's half of a stack: every region a head, passed
        (HalvesStack, 500, {}, 1, True),  # above HEAD_BYTES: heads up to it, at most half the regions
        (HalvesStack, None, {"prefetch_head": 1}, 1, True),  # asked for: as asked
        (HalvesStack, None, {"prefetch": 2}, 1, True),  # a prefetch given: the window's heads
        (HalvesStack, None, {"heads_as_inputs": False}, 1, False),  # the ops: the window's heads
        (Stack, None, {}, 2, True),  # a small model in one graph: no block of a stack, half the regions
    ],
)
def test_a_piece_of_a_stacks_block_passes_every_region_as_a_head(
    model_cls, head_bytes, options, heads, passed, offloaded, monkeypatch
):
    """Where heads are passed as inputs and a graph's offloaded weights total at most
    ``HEAD_BYTES`` and lie in one block of a stack of alike blocks (a piece Dynamo cut and reuses
    for every block), every region is a head: the graph has no fx_offload op, the device holds one
    block's weights between calls, every byte still crosses once per forward (each call refills
    the next block's), and calls read the right block's values. A small model compiled as one
    graph keeps the window's heads: offloading it still frees most of its weights."""
    if head_bytes is not None:
        monkeypatch.setattr(fx_offload.backend, "HEAD_BYTES", head_bytes)
    model = seeded(model_cls, n=4)
    plan = offloaded(model, HALVES if model_cls is HalvesStack else ["layers.*"])
    graphs = []
    fx_offload.backend.listeners.append(lambda gm, plan, regions: graphs.append((gm.code, regions)))
    try:
        compiled = _compiled(model, "offload_eager", **options)
        x = torch.randn(3, 8)
        with torch.no_grad():
            out, copied = _copied_per_call(compiled, x, calls=4)
    finally:
        fx_offload.backend.listeners.pop()
    torch.testing.assert_close(out, _restored_output(model, x), rtol=1e-5, atol=1e-6)
    region_bytes = 288 if model_cls is HalvesStack else 1120
    assert len(graphs) == (2 if model_cls is HalvesStack else 1)
    for code, regions in graphs:
        served = [r.passed or r.fetch.target is fx_offload.ops.HEAD for r in regions]
        assert served == [True] * heads + [False] * (len(regions) - heads)
        assert all(r.passed == passed for r in regions[:heads])
        assert ("fx_offload." in code) == (heads < len(regions) or not passed), code
    assert runtime.persistent_bytes() == len(graphs) * heads * region_bytes
    # (the second call still learns which block follows which: it copies some twice); a graph
    # called with the same weights each time copies none its heads hold
    held = runtime.persistent_bytes() if model_cls is Stack else 0
    assert copied[2:] == [plan.offloaded_bytes - held] * 2


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
@pytest.mark.parametrize("cls", [Stack, BreakingStack])
def test_a_graph_passed_its_heads_reads_the_head_buffers(backend, cls, offloaded):
    """The head buffers are what the graph reads, not the parameters: garbage put in them after
    a call's refill (which left them holding the next call's weights) comes out of the next call;
    once the runtime knows they hold nothing, the next call is right again."""
    model = seeded(cls, n=4)
    offloaded(model, ["layers.*"])
    compiled = _compiled(model, backend, heads_as_inputs=True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = compiled(x)
        compiled(x)  # (a graph reused per block has learned which block follows which)
        assert runtime.live_heads()
        for found in runtime.live_heads():
            for buffer in found.buffers:
                buffer.fill_(float("nan"))
        assert torch.isnan(compiled(x)).all()
        for found in runtime.live_heads():
            found.filled()  # (an unknown value: the next call copies the head before it runs)
        torch.testing.assert_close(compiled(x), expected)


@pytest.mark.parametrize(
    ("cls", "patterns", "make_input"),
    [
        (CalledTwice, ["shared", "mid"], lambda: torch.randn(3, 8)),
        (Tied, ["embed", "body", "lm_head"], lambda: torch.randint(0, 16, (2, 5))),
    ],
)
def test_passed_heads_of_shared_weights_are_one_set_and_each_is_read(cls, patterns, make_input, offloaded):
    """A module called twice, or a tied weight, makes two head regions of the same weights:
    passed as inputs, one set of buffers serves both (another would be filled and refilled every
    call with no read reaching it), and every set the graph holds is read: garbage in any one
    comes out of the next call."""
    model = seeded(cls)
    offloaded(model, patterns)
    x = make_input()
    compiled = _compiled(model, "offload_eager", prefetch=3, prefetch_head=3, heads_as_inputs=True)
    with torch.no_grad():
        expected = compiled(x)
        heads = runtime.live_heads()
        held = [tuple(sorted(found.positions)) for found in heads]
        assert len(set(held)) == len(held), held
        for found in heads:
            saved = [buffer.clone() for buffer in found.buffers]
            for buffer in found.buffers:
                buffer.fill_(float("nan"))
            assert torch.isnan(compiled(x)).any(), found.region
            found.filled()  # (an unknown value: the next call copies the head before it runs)
            torch.testing.assert_close(compiled(x), expected)
            for buffer, value in zip(found.buffers, saved):
                assert torch.equal(buffer, value)


@pytest.mark.parametrize("heads_as_inputs", [True, False])
def test_a_wrapped_graph_switches_dynamos_frame_evaluation_as_often_as_a_resident_graph(
    heads_as_inputs, offloaded
):
    """Dynamo wraps a backend's function in its ``disable`` (frames below it are not traced); the
    compiled graph inside the wrapper comes with one of its own, which the wrapper does not call
    again: a call with heads costs no more eval-frame switches than a resident graph's call."""
    from torch._dynamo import eval_frame

    def switches(model, backend, **options):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, options=options)
        x = torch.randn(3, 8)
        with torch.no_grad():
            compiled(x)
            compiled(x)
            with mock.patch.object(eval_frame, "set_eval_frame", wraps=eval_frame.set_eval_frame) as spy:
                compiled(x)
        return spy.call_count

    resident = switches(seeded(BreakingStack, n=4), "inductor")
    model = seeded(BreakingStack, n=4)
    offloaded(model, ["layers.*"])
    assert switches(model, "offload_inductor", heads_as_inputs=heads_as_inputs) == resident
    assert runtime.live_heads()


def _plain_slabs(params, device, pin_memory):
    """``placement._pinned_hosts`` with plain memory for slabs: host copies laid out as on a GPU."""
    return placement.slab_hosts([p for p in params if p.numel()], lambda n: torch.empty(n, dtype=torch.uint8))


@pytest.mark.parametrize(("model_cls", "patterns", "options", "runs"), [
    (HalvesStack, HALVES, {}, True),  # one block's half: its regions are heads, passed as inputs
    (BreakingStack, ["layers.*"], {}, True),
    # heads read by ``head`` ops, whose outputs must not alias each other: a buffer per weight
    (Stack, ["layers.*"], {"prefetch_head": 2, "heads_as_inputs": False}, False),
])  # fmt: skip
@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
def test_a_heads_weights_that_lie_in_one_slab_are_copied_as_one_run(
    model_cls, patterns, options, runs, backend, offloaded, monkeypatch
):
    """On a GPU host copies lie in pinned slabs, a region's weights one after another: a store of
    heads passed as inputs lays its buffers out as they lie (views of one device tensor), so a
    refill copies each run in one piece, not one copy per weight. (Here the slabs are plain
    memory.) Every block's values are read, and writes between calls."""
    monkeypatch.setattr(placement, "_pinned_hosts", _plain_slabs)
    # a parameter's data aliases its share of a slab with a storage of its own, as a CUDA alias does
    monkeypatch.setattr(placement, "_device_alias", lambda host, device: torch.from_numpy(host.numpy()))
    model = seeded(model_cls, n=4)
    offloaded(model, patterns)
    assert placement.runs([placement.lookup(p).host for p in model.layers[0].parameters()])[0][1] > 1
    compiled = _compiled(model, backend, **options)
    x = torch.randn(3, 8)
    copied = []
    copy_all = runtime.copy_all

    def spy(buffers, hosts):
        copied.append([b.dtype for b in buffers])
        copy_all(buffers, hosts)

    with torch.no_grad(), mock.patch.object(runtime, "copy_all", spy):
        for _ in range(3):
            out = compiled(x)
        torch.testing.assert_close(out, _restored_output(model, x), rtol=1e-5, atol=1e-6)
        for layer in model.layers:
            next(layer.parameters()).mul_(0.5)
        out = compiled(x)
    torch.testing.assert_close(out, _restored_output(model, x), rtol=1e-5, atol=1e-6)
    stores = {id(found.store): found.store for found in runtime.live_heads()}.values()
    assert stores and all((store.whole is not None) == runs for store in stores)
    assert ([torch.uint8] in copied) == runs  # a head's run of a weight and its bias, in one copy


def test_a_refill_that_raises_leaves_the_head_holding_nothing_and_the_next_call_copies_it(
    offloaded, monkeypatch
):
    """A head notes what it will hold before its copy is issued; where the copy raises (the call
    it follows fails with that error), it holds nothing known, so the next call copies the head
    before it runs instead of reading what the failed copy left: here the refill that loads block
    0 for the next forward, after the last block's call, fails half done."""
    model = seeded(BreakingStack, n=4)
    offloaded(model, ["layers.*"])
    compiled = _compiled(model, "offload_eager", heads_as_inputs=True)
    x = torch.randn(3, 8)
    first = {placement.lookup(p).host.data_ptr() for p in model.layers[0].parameters()}
    copy_all, armed = runtime.copy_all, []

    def failing(buffers, hosts):
        hosts = list(hosts)
        if armed and any(host.data_ptr() in first for host in hosts):
            armed.clear()
            for buffer in buffers:
                buffer.fill_(float("nan"))  # half done, then the error
            raise RuntimeError("copy failed")
        copy_all(buffers, hosts)

    monkeypatch.setattr(runtime, "copy_all", failing)
    with torch.no_grad():
        for _ in range(2):  # (the second forward learns which block follows which)
            compiled(x)
        armed.append(True)
        with pytest.raises(RuntimeError, match="copy failed"):
            compiled(x)
        assert not armed
        out = compiled(x)
    torch.testing.assert_close(out, _restored_output(model, x), rtol=1e-5, atol=1e-6)


def test_only_small_passed_stores_are_refilled_in_line():
    """A store the wrapper passes as a graph's inputs, of at most ``INLINE_BYTES``, is refilled on
    the compute stream (``inline``: no event orders it); a larger one, or one a graph's ops read
    (a CUDA graph waits for its event), keeps the copy stream."""
    cpu = torch.device("cpu")
    small = [((128,), torch.float32, cpu), ((128,), torch.float32, cpu)]  # 1 KiB
    large = [((runtime.INLINE_BYTES // 4 + 1,), torch.float32, cpu)]
    assert runtime._Store.empty(small, passed=True).inline
    assert not runtime._Store.empty(small, passed=False).inline
    assert not runtime._Store.empty(large, passed=True).inline


def test_a_packed_store_copies_each_run_of_any_block_even_one_that_straddles_two_slabs():
    """A packed store's buffers lie as a slab holds host copies, so every block's runs copy as
    they lie: block 0 in one slab (one copy), block 1 split between two slabs (two copies: the
    straddle does not change where its weights go), block 2 not in a slab (a copy per weight)."""
    specs = [((64,), torch.float32, torch.device("cpu")), ((8,), torch.float32, torch.device("cpu"))]
    specs.append(((4, 16), torch.bfloat16, torch.device("cpu")))
    store = runtime._Store.empty(specs, passed=True)
    assert {b.untyped_storage().data_ptr() for b in store.buffers} == {store.whole.data_ptr()}
    one, two, three = (torch.zeros(4096, dtype=torch.uint8) for _ in range(3))

    def block(*hosts):
        torch.manual_seed(len(hosts[0]))
        for host in hosts:
            host.copy_(torch.randn(host.shape))
        return [placement.HostParameter(("w",), h, torch.device("cpu"), True, lambda: None) for h in hosts]

    def lying(*places):  # tensors of the specs' shapes at these (memory, byte offset)
        return [
            memory[at : at + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for (memory, at), (shape, dtype, _) in zip(places, specs)
        ]

    alike = block(*lying((one, 0), (one, 512), (one, 1024)))
    straddling = block(*lying((two, 3840), (three, 0), (three, 512)))
    apart = block(torch.randn(64), torch.randn(8), torch.randn(4, 16).bfloat16())
    for records, pieces in [(alike, 1), (straddling, 2), (apart, 3)]:
        buffers, hosts = store.copies(records)
        assert len(buffers) == len(hosts) == pieces
        runtime.copy_all(buffers, hosts)
        for buffer, record in zip(store.buffers, records):
            torch.testing.assert_close(buffer, record.host, rtol=0, atol=0)
