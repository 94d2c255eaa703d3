"""Bad input, model surgery and faults never corrupt a model or fail silently (issue 6)."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fx_offload
from fx_offload import placement
from fx_offload.explain import recording
from fx_offload.matching import pattern_matches
from tests.models import Block, BreakingStack, Nested, Stack, seeded


def _compiled(model, **options):
    return torch.compile(model, backend="offload_eager", options=options or None)


@pytest.mark.parametrize(
    "surgery",
    [
        lambda m: m.half(),
        lambda m: m.to(torch.float64),
        lambda m: m.load_state_dict(seeded(Stack, seed=3).state_dict(), assign=True),
    ],
    ids=["half", "to_float64", "load_state_dict_assign"],
)
def test_replacing_offloaded_data_raises_at_the_next_compile_instead_of_running_resident(surgery):
    model = seeded(Stack)
    fx_offload.offload(model, ["layers"], device="cpu")
    compiled = _compiled(model)
    x = torch.randn(2, 8)
    with torch.no_grad():
        compiled(x)
    surgery(model)
    with pytest.raises(Exception, match="restore"), torch.no_grad():
        compiled(x.to(next(model.parameters()).dtype))
    fx_offload.restore(model)  # restore still works and forgets the stale records
    with torch.no_grad():
        xs = x.to(next(model.parameters()).dtype)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(model, backend="eager")(xs), model(xs))


def test_load_state_dict_in_place_is_seen_by_the_next_call():
    model = seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    compiled = _compiled(model)
    x = torch.randn(2, 8)
    other = seeded(Stack, seed=5)
    with torch.no_grad():
        compiled(x)
        model.load_state_dict(other.state_dict())
        assert torch.equal(compiled(x), other(x))
    fx_offload.restore(model)


def test_replacing_a_submodule_after_offload_runs_the_new_one_resident_and_correct():
    model = seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    compiled = _compiled(model)
    x = torch.randn(2, 8)
    with torch.no_grad():
        compiled(x)
        model.layers[1] = seeded(Block, seed=9)  # a new module, never offloaded: Dynamo recompiles
        assert torch.equal(compiled(x), model(x))
    assert all(placement.lookup(p) is None for p in model.layers[1].parameters())
    fx_offload.restore(model)


def test_replacing_a_submodule_frees_the_old_ones_host_copy():
    import gc
    import weakref

    model = seeded(Stack)
    plan = fx_offload.offload(model, ["layers.*"], device="cpu")
    x = torch.randn(2, 8)
    with torch.no_grad():
        _compiled(model)(x)
        hosts = [weakref.ref(placement.lookup(p).host) for p in model.layers[1].parameters()]
        offloaded = plan.offloaded_bytes
        model.layers[1] = seeded(Block, seed=9)
        gc.collect()
        assert all(host() is None for host in hosts)
        old = sum(p.numel() * p.element_size() for p in seeded(Block).parameters())
        assert plan.offloaded_bytes == offloaded - old
        assert torch.equal(_compiled(model)(x), model(x))
    fx_offload.restore(model)


def test_swapping_in_new_data_after_offload_raises_naming_restore():
    model = seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    compiled = _compiled(model)
    x = torch.randn(2, 8)
    with torch.no_grad():
        compiled(x)
        model.layers[1].fc1.weight.data = torch.randn(16, 8)  # same class, new memory: no recompile
        with pytest.raises(RuntimeError, match="restore"):
            compiled(x)
    fx_offload.restore(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_state_dict_bit_for_bit_through_offload_compile_and_restore(dtype):
    model = seeded(Stack).to(dtype)
    model.register_buffer("counts", torch.arange(-5, 5, dtype=torch.int8))
    model.layers[0].fc1.weight = nn.Parameter(torch.randn(8, 16, dtype=dtype).t())  # non-contiguous
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fx_offload.offload(model, ["layers"], device="cpu")
    with torch.no_grad():
        _compiled(model)(torch.randn(2, 8, dtype=dtype))
    for stage in ("offloaded", "restored"):
        after = model.state_dict()
        assert after.keys() == before.keys()
        for key in before:
            assert after[key].dtype == before[key].dtype, (stage, key)
            assert torch.equal(after[key], before[key]), (stage, key)
        if stage == "offloaded":
            fx_offload.restore(model)


def test_torch_save_of_an_offloaded_model_loads_into_a_plain_model():
    model = seeded(Nested)
    fx_offload.offload(model, ["visual"], device="cpu")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fx_offload.restore(model)
    plain = seeded(Nested, seed=7)
    plain.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_exception_inside_a_compiled_call_leaves_the_model_usable():
    model = seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    compiled = _compiled(model)
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
        with pytest.raises(RuntimeError):
            compiled(torch.randn(2, 5))  # a shape error inside the graph
        assert torch.equal(compiled(x), expected)
    assert all(placement.lookup(p) is not None for p in model.layers.parameters())
    fx_offload.restore(model)


def test_two_models_interleaved_and_one_model_compiled_twice():
    first, second = seeded(Stack, seed=1), seeded(Stack, seed=2)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = (first(x), second(x))
    fx_offload.offload(first, ["layers.*"], device="cpu")
    fx_offload.offload(second, ["layers"], device="cpu")
    a, b = _compiled(first), _compiled(second)
    a2 = _compiled(first, prefetch=0)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(a(x), expected[0])
            assert torch.equal(b(x), expected[1])
            assert torch.equal(a2(x), expected[0])
    fx_offload.restore(first)
    fx_offload.restore(second)


def test_training_offloaded_parameters_get_the_gradients_of_the_plain_model():
    plain, model = seeded(Stack), seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    x = torch.randn(4, 8)
    plain(x).square().sum().backward()
    _compiled(model)(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    fx_offload.restore(model)


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
def test_a_training_forward_computes_from_the_fetched_copies(backend):
    """AOTAutograd's training forward returns ``t(weight)`` for the backward and reads that same
    view in its matmul: the matmul reads a view of the fetched copy, and only the value saved for
    the backward reads the parameter (the compute must never read host memory over the bus)."""
    plain, model = seeded(Stack), seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    x = torch.randn(4, 8)
    with recording(lambda gm, plan, regions: (gm, plan)) as graphs:
        out = torch.compile(model, backend=backend)(x)
    out.square().sum().backward()
    plain(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    (gm, plan), *_ = graphs
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]

    def ours(node):  # fetch, head, refill, join: the pass's ops
        return getattr(node.target, "namespace", None) == "fx_offload"

    for i in plan.offloaded_inputs:
        for user in placeholders[i].users:
            if not ours(user) and user.op != "output":  # a view saved for the backward: read by
                # the output (and join) alone
                assert gm.graph.output_node() in user.users, f"{user.format_node()} computes from the host"
                assert all(ours(u) or u.op == "output" for u in user.users), user.format_node()
    fx_offload.restore(model)


def test_frozen_offloaded_parameters_beside_trained_ones():
    plain, model = seeded(Nested), seeded(Nested)
    for m in (plain, model):
        m.thinker.visual.requires_grad_(False)
    fx_offload.offload(model, ["visual"], device="cpu")
    x = torch.randn(4, 8)
    plain(x).sum().backward()
    _compiled(model)(x).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert q.grad is None
    fx_offload.restore(model)


def _owners(name: str) -> list[str]:
    """The modules that hold parameter ``name``: every proper prefix of its path."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


class Tree(nn.Module):
    """A random tree of residual linear leaves, named a, b, c... at each level."""

    def __init__(self, shape: list, dim: int) -> None:
        super().__init__()
        self.kids = nn.ModuleDict()
        for i, child in enumerate(shape):
            name = "abcdefgh"[i]
            self.kids[name] = Tree(child, dim) if isinstance(child, list) else nn.Linear(dim, dim, bias=child)

    def forward(self, x):
        for kid in self.kids.values():
            x = x + torch.tanh(kid(x)) if isinstance(kid, nn.Linear) else kid(x)
        return x


trees = st.recursive(st.booleans(), lambda kids: st.lists(kids, min_size=1, max_size=3), max_leaves=8).filter(
    lambda t: isinstance(t, list)
)


@settings(max_examples=15, deadline=None)
@given(shape=trees, rows=st.integers(1, 5), data=st.data())
def test_random_trees_and_patterns_match_eager_and_fetch_exactly_the_matched(shape, rows, data):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Tree(shape, 4).eval()
    modules = [name for name, m in model.named_modules() if name and any(True for _ in m.parameters())]
    chosen = data.draw(st.lists(st.sampled_from(modules), min_size=1, max_size=3, unique=True))
    x = torch.randn(rows, 4)
    with torch.no_grad():
        expected = model(x)
    plan = fx_offload.offload(model, chosen, device="cpu")
    try:
        with recording() as graphs, torch.no_grad():
            out = _compiled(model)(x)
        assert torch.equal(out, expected)
        lines = [line for graph in graphs for line in graph.splitlines()]
        named = {line.split(": ", 1)[1] for line in lines if line.startswith("# arg")}
        matched = {
            n
            for n, _ in model.named_parameters()
            if any(pattern_matches(c, prefix) for c in chosen for prefix in _owners(n))
        }
        # (a streamed module's 1-D parameters stay on the device when they are at most
        # keep_vectors, 5%, of its bytes: one bias among five 4x4 linears is 4.8%)
        kept = set(plan.kept)
        assert kept <= matched
        assert named == matched - kept == {r.names[0] for r in plan.records}
    finally:
        fx_offload.restore(model)


def test_write_through_data_outside_the_head_regions_is_seen():
    """``.data`` writes bypass the version counter: regions fetched in the call see them, heads
    (copied between calls) do not, which is why the README says to pass prefetch_head=False."""
    model = seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    compiled = _compiled(model, prefetch_head=1)
    x = torch.randn(2, 8)
    with torch.no_grad():
        compiled(x)
        model.layers[2].fc2.weight.data.copy_(torch.randn(8, 16))
        assert torch.equal(compiled(x), model(x))
    fx_offload.restore(model)


def test_out_of_device_memory_during_a_fetch_names_the_region_bytes_and_the_fix(monkeypatch):
    from fx_offload import runtime

    model = seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    weights = [p.data for p in model.layers[1].parameters()]

    def empty(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "empty_like", empty)  # what fetch allocates its buffers with
    with pytest.raises(torch.OutOfMemoryError) as info:
        runtime.fetch(weights, "layers.1")
    monkeypatch.undo()
    message = str(info.value)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    assert "'layers.1'" in message and f"{nbytes / 1e6:.1f} MB" in message and "prefetch" in message
    fx_offload.restore(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning only fails where there is no GPU")
def test_failure_to_pin_names_the_bytes_and_the_fix_and_loses_nothing():
    model = seeded(Stack)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.layers[0].fc1.weight
    with pytest.raises(RuntimeError, match="could not pin .* bytes .*ulimit -l"):
        placement._host_copy(weight.data, torch.device("cuda"), None, "layers.0.fc1.weight")
    with pytest.raises(ValueError, match="pin_memory=True needs an accelerator"):
        fx_offload.offload(model, ["layers"], device="cpu", pin_memory=True)
    assert fx_offload.plan_of(model) is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_placement_that_fails_midway_undoes_what_it_placed(monkeypatch):
    model = seeded(Stack)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = placement._host_copy
    calls = []

    def failing_second(data, device, pin_memory, name):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("simulated failure to pin")
        return real(data, device, pin_memory, name)

    monkeypatch.setattr(placement, "_host_copy", failing_second)
    with pytest.raises(RuntimeError, match="simulated"):
        fx_offload.offload(model, ["layers"], device="cpu")
    assert all(placement.lookup(p) is None and type(p) is nn.Parameter for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_parameters_read_outside_compiled_graphs_are_named_and_still_correct():
    from tests.models import EagerFrontEnd

    model = seeded(EagerFrontEnd)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    plan = fx_offload.offload(model, ["front", "block"], device="cpu")
    try:
        assert sorted(plan.outside_graphs()) == sorted(r.names[0] for r in plan.records)
        with torch.no_grad():
            out = torch.compile(model, backend="offload_inductor")(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        # the front runs where Dynamo does not compile: read in place, and named for the user
        assert sorted(plan.outside_graphs()) == ["front.bias", "front.weight"]
    finally:
        fx_offload.restore(model)


def _train(model, optimizer, compiled, steps=4):
    torch.manual_seed(11)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 8)
        loss = compiled(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("policy", ["stream", "swap"])
@pytest.mark.parametrize(
    "make",
    [
        lambda params: torch.optim.AdamW(params, lr=0.05, fused=True),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
    ],
    ids=["adamw_fused", "sgd_fused"],
)
def test_fused_optimizer_steps_are_seen_by_heads_and_swapped_components(policy, make):
    """Fused optimizer kernels leave the version counter alone; the next call must still read the
    new weights (heads in the stream policy, the component's device copy in swap)."""
    plain, model = seeded(Stack).train(), seeded(Stack).train()
    expected = _train(plain, make(plain.parameters()), plain)
    fx_offload.offload(model, ["layers.*"], device="cpu", policy=policy)
    try:
        got = _train(model, make(model.parameters()), _compiled(model, prefetch_head=1))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    finally:
        fx_offload.restore(model)


@pytest.mark.parametrize(
    "policy, backend",
    [
        ("stream", "offload_eager"),
        ("swap", "offload_eager"),
        ("stream", "offload_inductor"),
        ("swap", "offload_inductor"),
    ],
)
def test_in_place_writes_inside_forward_reach_the_offloaded_parameter(policy, backend):
    """Inductor keeps a forward's in-place write as ``copy_(param, new)`` in the graph: it must
    store into the parameter's host memory, not into a fetched copy."""
    from tests.models import SelfWriting

    plain, model = seeded(SelfWriting), seeded(SelfWriting)
    fx_offload.offload(model, ["body"], device="cpu", policy=policy)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(3, 8)
    try:
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(plain.named_parameters(), model.parameters()):
            assert torch.equal(q, p), name
    finally:
        fx_offload.restore(model)


def _self_writing_graph():
    """``p * 2`` read, then stored back into ``p`` as functionalization leaves it."""
    graph = torch.fx.Graph()
    p, x = graph.placeholder("p"), graph.placeholder("x")
    doubled = graph.call_function(torch.ops.aten.mul.Tensor, (p, 2))
    graph.call_function(torch.ops.aten.copy_.default, (p, doubled))
    graph.output((graph.call_function(torch.ops.aten.add.Tensor, (x, doubled)),))
    with torch._subclasses.FakeTensorMode() as mode:
        p.meta["val"], x.meta["val"] = torch.empty(4), torch.empty(4)
        doubled.meta["val"] = torch.empty(4)
    return graph, mode


@pytest.mark.parametrize("cudagraphs", [False, True])
def test_a_write_into_an_offloaded_parameter_stores_into_it_and_raises_under_cuda_graphs(cudagraphs):
    from fx_offload.regions import GraphPlan
    from fx_offload.rewrite import rewrite

    graph, _ = _self_writing_graph()
    plan = GraphPlan({0: "body.scale"}, device_type="cuda", prefetch_head=0)
    with torch._inductor.config.patch({"triton.cudagraphs": cudagraphs}):
        if cudagraphs:
            with pytest.raises(RuntimeError, match="'body.scale' in place.*without CUDA graphs"):
                rewrite(graph, plan)
            return
        rewrite(graph, plan)
    p = next(iter(graph.nodes))
    (store,) = [n for n in graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert store.args[0] is p  # the parameter itself, not a fetched copy


def _write_through_data(p, value):
    p.data.copy_(value)


def _write_through_numpy(p, value):
    p.detach().numpy()[...] = value.numpy()


@pytest.mark.parametrize("policy", ["stream", "swap"])
@pytest.mark.parametrize("write", [_write_through_data, _write_through_numpy], ids=["data", "numpy"])
def test_a_write_that_bypasses_the_version_counter_is_seen_after_increment_version(policy, write):
    """The remedy the README gives for writes a held copy cannot see (a head's or a swapped
    component's): bump the parameter's version counter after writing."""
    from torch.autograd.graph import increment_version

    model = seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu", policy=policy)
    compiled = _compiled(model, prefetch_head=1)
    x = torch.randn(2, 8)
    with torch.no_grad():
        compiled(x)
        weight = model.layers[0].fc1.weight  # the head's, under stream
        write(weight, torch.randn(16, 8))
        increment_version(weight)
        assert torch.equal(compiled(x), model(x))
    fx_offload.restore(model)


_OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["call", "step", "step_fused", "write", "load"]),
        st.integers(0, 1),  # which of the two models
    ),
    min_size=2,
    max_size=8,
)
_SEQUENCES = dict(
    writes_inside=st.booleans(), head=st.integers(0, 1), operations=_OPERATIONS, seed=st.integers(0, 2**16)
)


@settings(max_examples=12, deadline=None)
@given(policy=st.sampled_from(["stream", "swap"]), **_SEQUENCES)
def test_random_calls_steps_and_writes_on_two_models_of_one_class_match_the_plain_models(
    policy, writes_inside, head, operations, seed
):
    _run_sequence(policy, writes_inside, head, operations, seed)


def _run_sequence(policy, writes_inside, head, operations, seed):
    """Forward calls, optimizer steps (fused and not) and in-place writes between calls (``mul_``,
    ``load_state_dict``) and inside them (a model that writes its own parameters in forward),
    interleaved over two offloaded models of one class (which share Dynamo's graphs); every
    output, loss and final parameter equals the plain models'."""
    from tests.models import SelfWriting

    torch._dynamo.reset()
    cls = SelfWriting if writes_inside else Stack
    plains = [seeded(cls, seed=seed + i) for i in range(2)]
    models = [seeded(cls, seed=seed + i) for i in range(2)]
    pattern = ["body"] if writes_inside else ["layers.*"]
    for model in models:
        fx_offload.offload(model, pattern, device="cpu", policy=policy)

    def optimizers(model):
        return {
            "step_fused": torch.optim.AdamW(model.parameters(), lr=0.01, fused=True),
            "step": torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5),
        }

    plain_opts, model_opts = [optimizers(m) for m in plains], [optimizers(m) for m in models]
    compiled = [_compiled(m, prefetch_head=head) for m in models]
    generator = torch.Generator().manual_seed(seed)
    try:
        for k, (what, i) in enumerate(operations):
            x = torch.randn(3, 8, generator=generator)
            if what == "call":
                with torch.no_grad():
                    expected, got = plains[i](x), compiled[i](x)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"operation {k}")
            elif what.startswith("step"):
                losses = []
                for run, opts in ((plains[i], plain_opts[i]), (compiled[i], model_opts[i])):
                    loss = run(x).square().mean()
                    loss.backward()
                    opts[what].step()
                    opts[what].zero_grad()
                    losses.append(loss.detach())
                torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5, msg=f"operation {k}")
            elif what == "write":
                factor = 0.5 + torch.rand((), generator=generator).item()
                for model in (plains[i], models[i]):
                    with torch.no_grad():
                        for p in model.parameters():
                            p.mul_(factor)
            else:
                state = seeded(cls, seed=seed + 7 + k).state_dict()
                for model in (plains[i], models[i]):
                    model.load_state_dict(state)
        for plain, model in zip(plains, models):
            for (name, p), q in zip(plain.named_parameters(), model.parameters()):
                torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        for model in models:
            fx_offload.restore(model)


@pytest.mark.parametrize("heads_as_inputs", [True, False])
def test_graphs_loaded_from_inductors_caches_serve_their_heads_and_see_writes(
    heads_as_inputs, tmp_path, monkeypatch
):
    """A compile served from Inductor's and AOTAutograd's caches (a new process, or a new
    compile after ``torch._dynamo.reset()``) skips the offload pass: the graph it loads must run
    with the wrapper and heads that this compile made, reading the current weights."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from fx_offload import runtime

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    options = {"heads_as_inputs": heads_as_inputs, "prefetch_head": 1}
    x = torch.randn(3, 8)
    with inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True):
        for compile_ in ("miss", "hit"):
            torch._dynamo.reset()
            hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
            model, plain = seeded(BreakingStack, n=4), seeded(BreakingStack, n=4)
            fx_offload.offload(model, ["layers.*"], device="cpu")
            try:
                compiled = torch.compile(model, backend="offload_inductor", options=options)
                with torch.no_grad():
                    for step in range(3):
                        torch.testing.assert_close(compiled(x), plain(x))
                        for m in (model, plain):
                            m.layers[step].fc1.weight.mul_(0.5)
                assert runtime.live_heads()
            finally:
                fx_offload.restore(model)
            now = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
            assert (now > hits) == (compile_ == "hit"), (compile_, hits, now)
