"""On a CUDA device: numerics, CUDA graphs, memory bounds and capture boundaries.

Skipped without CUDA. Run on the GPU machine with ``python -m pytest -q tests/gpu``.
"""

import gc
from unittest import mock

import pytest
import torch

import fx_offload
from fx_offload import backend, estimate, placement, runtime
from fx_offload.explain import recording
from tests.models import BreakingStack, Broken, CpuHop, HalvesStack, Stack, seeded

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def _on_gpu(model, dtype):
    return model.to("cuda", dtype)


class _Recordings:
    """Counts CUDA graph recordings and skips while active."""

    def __enter__(self):
        from torch._dynamo.utils import counters
        from torch._inductor import cudagraph_trees

        self.counters = counters
        self.skips_before = counters["inductor"]["cudagraph_skips"]
        self.records = 0
        original = cudagraph_trees.CUDAGraphTreeManager.record_function

        def counting(manager, *args, **kwargs):
            self.records += 1
            return original(manager, *args, **kwargs)

        self.patch = mock.patch.object(cudagraph_trees.CUDAGraphTreeManager, "record_function", counting)
        self.patch.__enter__()
        return self

    @property
    def skips(self):
        return self.counters["inductor"]["cudagraph_skips"] - self.skips_before

    def __exit__(self, *exc):
        self.patch.__exit__(*exc)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_resident_model_and_replays_fresh_values(dtype, mode):
    model = _on_gpu(seeded(Stack, n=4, dim=256, hidden=1024), dtype)
    inputs = [torch.randn(32, 256, device="cuda", dtype=dtype) for _ in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    fx_offload.offload(model, ["layers.*"])
    try:
        compiled = torch.compile(model, backend="offload_inductor", mode=mode)
        with _Recordings() as graphs, torch.no_grad():
            first = [compiled(x).clone() for x in inputs]
            recorded = graphs.records
            again = [compiled(x).clone() for x in reversed(inputs)][::-1]
        for out, ref in zip(first + again, expected + expected):
            torch.testing.assert_close(out, ref, **TOLERANCE[dtype])
        if mode == "reduce-overhead":
            assert graphs.skips == 0, "Inductor skipped CUDA graphs"
            assert recorded >= 1 and graphs.records == recorded, "re-recorded on a later call"
    finally:
        fx_offload.restore(model)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("prefetch", [0, 1, 2, "auto"])
def test_peak_memory_holds_at_most_prefetch_plus_one_regions(prefetch, mode):
    """The heads (persistent between calls) count among the prefetch + 1 regions: the base leaves
    them out. With "auto" the bound is the prefetch the backend chose."""
    dim, hidden, blocks = 1024, 4096, 8
    model = _on_gpu(seeded(Stack, n=blocks, dim=dim, hidden=hidden), torch.bfloat16)
    block_bytes = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    x = torch.randn(16, dim, device="cuda", dtype=torch.bfloat16)
    fx_offload.offload(model, ["layers.*"])
    chosen = []

    def listener(gm, plan, regions):
        chosen.append(plan.prefetch)

    backend.listeners.append(listener)
    try:
        # torch.compile takes mode or options, not both: triton.cudagraphs is what the mode sets
        options = {"prefetch": prefetch, "triton.cudagraphs": mode == "reduce-overhead"}
        compiled = torch.compile(model, backend="offload_inductor", options=options)
        with torch.no_grad():
            for _ in range(3):
                compiled(x)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated() - runtime.persistent_bytes()  # heads count in extra
            torch.cuda.reset_peak_memory_stats()
            compiled(x)
            torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        (window,) = set(chosen)
        activations = 8 * 16 * hidden * 2 + (1 << 20)
        assert extra <= (window + 1) * block_bytes + activations, (extra, block_bytes, window)
        if mode is None:  # without a CUDA graph pool the fetched weights are allocated per call
            assert extra >= min(window + 1, blocks) * block_bytes
    finally:
        backend.listeners.remove(listener)
        fx_offload.restore(model)


def test_graph_break_under_reduce_overhead():
    model = _on_gpu(seeded(Broken, dim=64), torch.float32)
    x = torch.randn(8, 64, device="cuda")
    with torch.no_grad():
        expected = model(x)
    fx_offload.offload(model, ["first", "second"])
    try:
        compiled = torch.compile(model, backend="offload_inductor", mode="reduce-overhead")
        with _Recordings() as graphs, torch.no_grad():
            outs = [compiled(x).clone() for _ in range(4)]
        assert graphs.skips == 0
        for out in outs:
            torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
    finally:
        fx_offload.restore(model)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_cpu_op_between_fetch_and_use_keeps_the_fetch_after_it(mode):
    model = _on_gpu(seeded(CpuHop, dim=64, hidden=128), torch.float32)
    x = torch.randn(8, 64, device="cuda")
    with torch.no_grad():
        expected = model(x)
    fx_offload.offload(model, ["first", "second"])
    try:
        options = {"prefetch": 1, "triton.cudagraphs": mode == "reduce-overhead"}
        compiled = torch.compile(model, backend="offload_inductor", options=options)
        with recording() as graphs, torch.no_grad():
            outs = [compiled(x).clone() for _ in range(4)]
        for out in outs:
            torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
        (text,) = graphs
        lines = text.splitlines()
        to_host = max(i for i, line in enumerate(lines) if "device(type='cpu')" in line)
        fetch_second = next(
            i for i, line in enumerate(lines) if "fetch.default(" in line and "'second'" in line
        )
        assert fetch_second > to_host, "the fetch was hoisted above the trip to host memory"
    finally:
        fx_offload.restore(model)


def test_offloaded_parameters_live_once_in_pinned_memory_and_eager_stays_correct():
    model = _on_gpu(seeded(Stack, n=2, dim=64, hidden=128), torch.float32)
    x = torch.randn(4, 64, device="cuda")
    with torch.no_grad():
        expected = model(x)
    before = torch.cuda.memory_allocated()
    plan = fx_offload.offload(model, ["layers"])
    try:
        assert torch.cuda.memory_allocated() < before  # the device copies were freed
        for record in plan.records:
            param = record.param()
            assert record.host.is_pinned() and param.is_cuda
            assert param.data_ptr() == record.host.data_ptr()  # the alias is the host memory
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)  # eager reads over the bus
    finally:
        fx_offload.restore(model)
    assert all(placement.lookup(p) is None and p.is_cuda for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_an_eager_frame_reads_in_place_correctly_and_is_named():
    from tests.models import EagerFrontEnd

    model = _on_gpu(seeded(EagerFrontEnd, dim=64), torch.float32)
    x = torch.randn(4, 64, device="cuda")
    with torch.no_grad():
        expected = model(x)
    plan = fx_offload.offload(model, ["front", "block"], keep_vectors=0)  # (front.bias too)
    try:
        with torch.no_grad():
            out = torch.compile(model, backend="offload_inductor", mode="reduce-overhead")(x)
        torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
        assert sorted(plan.outside_graphs()) == ["front.bias", "front.weight"]
    finally:
        fx_offload.restore(model)


@pytest.mark.parametrize("head", [True, False, 2])
def test_weights_written_between_calls_are_read_by_the_next_replay(head):
    """The head is refilled by the previous call; a weight written in place since then is copied
    again by the wrapper before the replay, with no sync between the write and the call."""
    model = _on_gpu(seeded(Stack, n=6, dim=1024, hidden=4096), torch.float32)  # 33.6 MB a block
    plain = _on_gpu(seeded(Stack, n=6, dim=1024, hidden=4096), torch.float32)
    x = torch.randn(16, 1024, device="cuda")
    fx_offload.offload(model, ["layers.*"])
    try:
        options = {"prefetch_head": head, "triton.cudagraphs": True}
        compiled = torch.compile(model, backend="offload_inductor", options=options)
        with _Recordings() as graphs, torch.no_grad():
            for step in range(5):
                for m in (model, plain):
                    for layer in m.layers:
                        layer.fc1.weight.mul_(0.9)
                        layer.fc2.bias.add_(0.01)
                out = compiled(x)
                torch.testing.assert_close(out, plain(x), **TOLERANCE[torch.float32])
                if step == 2:
                    recorded = graphs.records
            assert graphs.skips == 0, "Inductor skipped CUDA graphs"
            assert recorded >= 1 and graphs.records == recorded, "re-recorded on a later call"
    finally:
        fx_offload.restore(model)


@pytest.mark.parametrize("cls", [Stack, BreakingStack])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_refill_in_graph_copies_part_of_the_heads_inside_the_call(mode, cls):
    """``refill_in_graph`` bytes of the heads' refill are copied inside the call (captured in its
    CUDA graph), the rest after it. A graph reused for every block (BreakingStack) copies none
    in the call once it has run other weights (its next call runs the next block), and the
    wrapper the next block's head whole. Weights change in place between calls, with no sync:
    every call reads the current values."""
    # a cut inside the first head's first weight: 16 MiB in Stack's blocks, 64 KiB in BreakingStack's
    big = cls is Stack
    dims, in_graph = ({"dim": 1024, "hidden": 4096}, 3 << 20) if big else ({"dim": 1024}, 40_000)
    model = _on_gpu(seeded(cls, n=4, **dims), torch.float32)
    plain = _on_gpu(seeded(cls, n=4, **dims), torch.float32)
    x = torch.randn(16, 1024, device="cuda")
    fx_offload.offload(model, ["layers.*"])
    try:
        cudagraphs = mode == "reduce-overhead"
        options = {"prefetch_head": 2, "refill_in_graph": in_graph, "triton.cudagraphs": cudagraphs}
        # (a refill_in_graph given keeps the heads' ops without CUDA graphs too)
        compiled = torch.compile(model, backend="offload_inductor", options=options)
        with _Recordings() as graphs, torch.no_grad():
            for step in range(6):
                if step % 2:
                    for m in (model, plain):
                        for layer in m.layers:
                            layer.fc1.weight.mul_(0.9)
                out = compiled(x)
                torch.testing.assert_close(out, plain(x), **TOLERANCE[torch.float32])
        split = [found.in_graph for found in runtime.live_heads()]
        assert (in_graph in split) if big else (split and not any(split)), split
        if mode == "reduce-overhead":
            assert graphs.skips == 0, "Inductor skipped CUDA graphs"
    finally:
        fx_offload.restore(model)


def test_graphs_compiled_for_dynamic_shapes_estimate_their_refill_at_the_sizes_seen():
    """Under CUDA graphs a graph's heads are refilled by its own ops, whose in-call part is
    estimated from its tail's shapes; a graph compiled for dynamic shapes (generate() with another
    prompt length) has symbols there, timed at their hints instead of failing the compile."""
    model = _on_gpu(seeded(Stack, n=4, dim=256, hidden=1024), torch.float32)
    plain = _on_gpu(seeded(Stack, n=4, dim=256, hidden=1024), torch.float32)
    fx_offload.offload(model, ["layers.*"])
    try:
        compiled = torch.compile(model, backend="offload_inductor", mode="reduce-overhead", dynamic=True)
        with torch.no_grad(), mock.patch.object(estimate, "tail_bytes", wraps=estimate.tail_bytes) as spy:
            for rows in (8, 24, 8, 40):
                x = torch.randn(rows, 256, device="cuda")
                torch.testing.assert_close(compiled(x), plain(x), **TOLERANCE[torch.float32])
        assert spy.called, "no graph estimated its refill"
        assert any(  # a graph with symbolic sizes estimated it
            isinstance(size, torch.SymInt)
            for call in spy.call_args_list
            for node in call.args[0]
            for size in getattr(node.meta.get("val"), "shape", ())
        ), "no graph compiled for dynamic shapes"
    finally:
        fx_offload.restore(model)


@pytest.mark.parametrize("head", [1, 2])
@pytest.mark.parametrize(("mode", "passed"), [(None, False), (None, True), ("reduce-overhead", False)])
def test_the_next_call_waits_for_the_refill_of_its_head(mode, passed, head):
    """The head's refill is issued when a call returns, on the copy stream, and the next call's
    graph waits for it. Here each refill is delayed (~25 ms asleep on the copy stream) and the head
    buffers are poisoned before it: a call that read them without waiting would read NaN. (All of
    the refill after the call, ``refill_in_graph=0``: the poison would hit the part copied in the
    call, which the wrapper does not copy again.)"""
    model = _on_gpu(seeded(Stack, n=4, dim=256, hidden=1024), torch.float32)
    inputs = [torch.randn(32, 256, device="cuda") for _ in range(3)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    fx_offload.offload(model, ["layers.*"])
    original, refills = runtime._refill_after, []

    def late(found):
        compute = torch.cuda.current_stream()
        for buffer in found.buffers:  # after this call's kernels, which read them
            buffer.fill_(float("nan"))
        found.filled()  # (they hold nothing now: refilled even for the same weights)
        copy = runtime.device_runtime(found.buffers[0].device).copy_stream()
        copy.wait_stream(compute)
        with torch.cuda.stream(copy):
            torch.cuda._sleep(50_000_000)
        refills.append(found)
        original(found)

    try:
        cudagraphs = mode == "reduce-overhead"
        options = {"prefetch_head": head, "refill_in_graph": 0, "triton.cudagraphs": cudagraphs}
        # passed: the wrapper hands the graph the head buffers and waits for the refill itself
        options["heads_as_inputs"] = passed
        compiled = torch.compile(model, backend="offload_inductor", options=options)
        with mock.patch.object(runtime, "_refill_after", late), _Recordings() as graphs, torch.no_grad():
            outs = [compiled(x).clone() for x in inputs * 3]  # no sync between calls
        torch.cuda.synchronize()
        # passed heads are one set of buffers, refilled at once; the ops' heads one each
        per_call = 1 if passed else head
        assert len(refills) == per_call * len(outs), "the wrapper did not refill the head after every call"
        for out, ref in zip(outs, expected * 3):
            torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
        if mode == "reduce-overhead":
            assert graphs.skips == 0, "Inductor skipped CUDA graphs"
    finally:
        fx_offload.restore(model)


def test_the_pieces_of_a_graph_broken_stack_are_all_heads_and_read_the_right_block():
    """Without CUDA graphs each half of a graph-broken block (two regions) is all heads, passed
    as inputs: no fx_offload op in its graph; the refill after each call loads the next block's
    weights, delayed here on the copy stream (~25 ms asleep) with the buffers poisoned before it,
    so a call that read them without waiting would read NaN; in-place writes between forwards are
    read; one block's weights stay on the device between calls."""
    model = _on_gpu(seeded(HalvesStack, n=4, dim=256), torch.float32)
    x = torch.randn(32, 256, device="cuda")
    patterns = ["layers.*.a", "layers.*.b", "layers.*.c", "layers.*.d"]
    plan = fx_offload.offload(model, patterns)
    original, codes = runtime._refill_after, []

    def late(found):
        compute = torch.cuda.current_stream()
        for buffer in found.buffers:
            buffer.fill_(float("nan"))
        found.filled()  # (they hold nothing now: refilled even for the same weights)
        copy = runtime.device_runtime(found.buffers[0].device).copy_stream()
        copy.wait_stream(compute)
        with torch.cuda.stream(copy):
            torch.cuda._sleep(50_000_000)
        original(found)

    backend.listeners.append(lambda gm, plan, regions: codes.append(gm.code))
    try:
        compiled = torch.compile(model, backend="offload_inductor")
        with mock.patch.object(runtime, "_refill_after", late), torch.no_grad():
            outs = [compiled(x).clone() for _ in range(3)]  # no sync between calls
            for layer in model.layers:
                layer.d.weight.mul_(0.5)
            outs.append(compiled(x).clone())
        torch.cuda.synchronize()
        assert len(codes) == 2 and not any("fx_offload" in code for code in codes), codes
        assert runtime.persistent_bytes() == plan.offloaded_bytes // 4  # one block's
        fx_offload.restore(model)
        with torch.no_grad():
            expected_last = model(x)
            for layer in model.layers:
                layer.d.weight.mul_(2.0)
            expected = model(x)
        for out in outs[:3]:
            torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
        torch.testing.assert_close(outs[3], expected_last, **TOLERANCE[torch.float32])
    finally:
        backend.listeners.pop()
        if fx_offload.plan_of(model) is not None:
            fx_offload.restore(model)


def test_small_passed_heads_are_refilled_in_line_on_the_compute_stream():
    """A passed head of at most ``INLINE_BYTES`` (each 33 KB half of these blocks, as a norm's
    weights would be) has no copy stream event: the wrapper refills it on the compute stream after
    the call, in order with the calls that read it. Every call reads its block's current values,
    written in place between forwards, with no sync; a larger head keeps the copy stream."""
    for dim, inline in ((64, True), (256, False)):
        model = _on_gpu(seeded(HalvesStack, n=4, dim=dim), torch.float32)
        plain = _on_gpu(seeded(HalvesStack, n=4, dim=dim), torch.float32)
        x = torch.randn(32, dim, device="cuda")
        fx_offload.offload(model, ["layers.*.a", "layers.*.b", "layers.*.c", "layers.*.d"])
        try:
            compiled = torch.compile(model, backend="offload_inductor")
            outs, refs = [], []
            with torch.no_grad():
                for step in range(5):
                    if step % 2:
                        for m in (model, plain):
                            for layer in m.layers:
                                layer.c.weight.mul_(0.9)
                    outs.append(compiled(x))
                    refs.append(plain(x))
            for out, ref in zip(outs, refs):
                torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
            ours = {p.data_ptr() for p in model.parameters()}
            stores = [h.store for h in runtime.live_heads() if h.holds and set(h.holds[0]) <= ours]
            assert stores and all(store.inline == inline for store in stores), dim
            assert all((store.refilled is None) == inline for store in stores), dim
        finally:
            fx_offload.restore(model)
            torch._dynamo.reset()


@pytest.mark.parametrize("model_cls", [Stack, BreakingStack])
def test_calls_on_a_side_stream_keep_it_current_and_match_the_default_stream(model_cls):
    """The copies make the copy stream current directly (not through ``torch.cuda.stream``):
    a call made on the user's own stream leaves that stream current, its outputs equal those of
    calls on the default stream, and the runtime reuses a bounded set of events."""
    plain, model = seeded(model_cls).cuda(), seeded(model_cls).cuda()
    fx_offload.offload(model, ["layers.*"])
    compiled = torch.compile(model, backend="offload_inductor")
    x = torch.randn(4, 8, device="cuda")
    side = torch.cuda.Stream()
    try:
        with torch.no_grad():
            expected = plain(x)
            torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(50):
                    out = compiled(x)
                assert torch.cuda.current_stream() == side
            torch.cuda.current_stream().wait_stream(side)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        device = runtime.device_runtime(x.device)
        assert len(device._events) <= runtime._FREE_EVENTS
        assert not device.inflight or all(e is None for e in device.inflight.values())
    finally:
        fx_offload.restore(model)


def test_pinned_host_memory_is_the_slabs_the_layout_chose():
    """torch's pinned allocator rounds every allocation up to a power of two: one pinned tensor per
    weight took 1.43x the bytes of a Qwen2-3B layer (its 43 MiB MLP weights in 64 MiB each). The
    weights are placed in power-of-two slabs (``placement.slab_layout``): the pinned bytes are
    the slabs' and fewer than one allocation per weight would take; values, outputs and restore
    are unchanged, and ``restore`` gives the slabs back."""
    torch.manual_seed(0)
    shapes = [(2048, 11008), (11008, 2048), (2048, 2048)] * 2  # two layers' weights, Qwen2-3B sizes
    model = torch.nn.Sequential(*[torch.nn.Linear(i, o) for i, o in shapes]).to("cuda", torch.bfloat16)
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
    sizes = [p.nbytes for p in model.parameters()]
    slabs, _ = placement.slab_layout(sizes)
    alone = sum(placement.slab_layout([size])[0][0] for size in sizes)

    def held():  # pinned bytes held: torch's "active" count is not lowered on free, so empty the cache
        gc.collect()
        torch.cuda.synchronize()
        torch._C._host_emptyCache()  # frees every cached block no tensor uses
        return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)

    before = held()
    plan = fx_offload.offload(model, ["*"], keep_vectors=0)  # the biases in the slabs too
    try:
        pinned = held() - before
        assert pinned == sum(slabs) < alone and plan.offloaded_bytes == sum(sizes), (pinned, slabs, alone)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach().cpu(), values[name].cpu(), rtol=0, atol=0)
        compiled = torch.compile(model, backend="offload_inductor")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), expected, **TOLERANCE[torch.bfloat16])
    finally:
        fx_offload.restore(model)
    del compiled
    torch._dynamo.reset()
    assert held() == before, (held(), before)  # restore gives the slabs back, the plan kept or not
    for name, p in model.named_parameters():
        assert p.device.type == "cuda"
        torch.testing.assert_close(p.detach(), values[name], rtol=0, atol=0)


@pytest.mark.parametrize("cls", [Stack, BreakingStack])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_graphs_of_two_shapes_share_head_buffers_and_replay_fresh_values(mode, cls):
    """generate()'s case: a graph per shape, whose heads read the same weights and share one set
    of buffers (recorded into both CUDA graphs, refilled after either's call), called in turn with
    weights written between calls: every replay reads the values of its own call."""
    sizes = {"dim": 1024, "hidden": 4096} if cls is Stack else {"dim": 1024}
    model = _on_gpu(seeded(cls, n=6, **sizes), torch.float32)
    plain = _on_gpu(seeded(cls, n=6, **sizes), torch.float32)
    inputs = [torch.randn(16, 1024, device="cuda"), torch.randn(8, 1024, device="cuda")]
    fx_offload.offload(model, ["layers.*"])
    try:
        compiled = torch.compile(model, backend="offload_inductor", mode=mode, dynamic=False)
        with torch.no_grad():
            for step in range(8):
                if step % 3 == 2:
                    for m in (model, plain):
                        for layer in m.layers:
                            layer.fc1.weight.mul_(0.9)
                x = inputs[step % 2]
                torch.testing.assert_close(compiled(x), plain(x), **TOLERANCE[torch.float32])
        ours = {p.data_ptr() for p in model.parameters()}  # (not a graph an earlier test left)
        heads = [found for found in runtime.live_heads() if found.holds and set(found.holds[0]) <= ours]
        assert heads and len({id(found.store) for found in heads}) * 2 == len(heads)
    finally:
        fx_offload.restore(model)


def test_passed_heads_are_copied_in_runs_as_their_weights_lie_in_a_slab():
    """A graph reused for every block passes its heads as inputs: their weights lie one after
    another in a pinned slab, and the heads' buffers are views of one device tensor laid out as a
    slab holds them, so a refill is one copy per run, not one per weight. Every block's values are read,
    and writes between calls."""
    # (1200 wide: each block's weights share a slab; weights of a power of two bytes, 1024 wide,
    # take one allocation each, which is smaller than a slab that holds them)
    model = _on_gpu(seeded(BreakingStack, n=6, dim=1200), torch.float32)
    plain = _on_gpu(seeded(BreakingStack, n=6, dim=1200), torch.float32)
    x = torch.randn(16, 1200, device="cuda")
    fx_offload.offload(model, ["layers.*"], keep_vectors=0)  # each head a weight and its bias
    copied = []
    copy_all = runtime.copy_all

    def spy(buffers, hosts):
        copied.append([b.dtype for b in buffers])
        copy_all(buffers, hosts)

    try:
        compiled = torch.compile(model, backend="offload_inductor")
        with torch.no_grad(), mock.patch.object(runtime, "copy_all", spy):
            for step in range(6):
                if step == 3:
                    for m in (model, plain):
                        for layer in m.layers:
                            layer.fc1.weight.mul_(0.9)
                torch.testing.assert_close(compiled(x), plain(x), **TOLERANCE[torch.float32])
        ours = {p.data_ptr() for p in model.parameters()}
        stores = {id(h.store): h.store for h in runtime.live_heads() if h.holds and set(h.holds[0]) <= ours}
        assert stores and all(store.whole is not None for store in stores.values())
        assert [torch.uint8] in copied
    finally:
        fx_offload.restore(model)
