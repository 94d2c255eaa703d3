"""Where fx_offload keeps its state: per device, per compiled graph, per model, never shared
between models through a graph Dynamo reuses, and never keeping a dropped model alive."""

import ctypes
import gc
import os
import threading
import weakref

import pytest
import torch

import fx_offload
from fx_offload import placement, runtime
from fx_offload.explain import recording
from tests.models import Nested, Stack, seeded


def _compiled(model, backend="offload_eager", **options):
    return torch.compile(model, backend=backend, options=options)


def test_two_models_of_one_class_called_from_two_threads_read_their_own_weights():
    """Dynamo reuses one graph for both models; each thread's calls read that thread's model."""
    models = [seeded(Stack, n=4, dim=64, hidden=128, seed=s) for s in (1, 2)]
    x = torch.randn(16, 64)
    with torch.no_grad():
        expected = [model(x) for model in models]
    for model in models:
        fx_offload.offload(model, ["layers.*"], device="cpu")
    try:
        compiled = [_compiled(model, prefetch_head=2) for model in models]
        with torch.no_grad():
            for fn in compiled:
                fn(x)  # compiled (and the graph reused) before the threads start
        wrong = [0, 0]
        barrier = threading.Barrier(2)

        def calls(k):
            barrier.wait()
            with torch.no_grad():
                for _ in range(50):
                    if not torch.allclose(compiled[k](x), expected[k], rtol=1e-5, atol=1e-5):
                        wrong[k] += 1

        threads = [threading.Thread(target=calls, args=(k,)) for k in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wrong == [0, 0], f"outputs of 50 calls per thread that read the other model's weights: {wrong}"
    finally:
        for model in models:
            fx_offload.restore(model)


def _rss() -> int:
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # what the allocator keeps for reuse is no leak
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("policy", ["stream", "swap"])
def test_offloaded_models_dropped_without_restore_leave_nothing_behind(policy):
    """20 offloaded models (4 MB each) compiled, called and dropped: the graphs Dynamo keeps for
    their class hold none of them, host memory comes back within 10 MB, the registries empty."""
    x = torch.randn(4, 256)
    refs = []

    def one(seed):
        model = seeded(Stack, n=4, dim=256, hidden=512, seed=seed)
        patterns = ["layers"] if policy == "swap" else ["layers.*"]
        fx_offload.offload(model, patterns, device="cpu", policy=policy)
        with torch.no_grad():
            _compiled(model)(x)
        refs.append(weakref.ref(model))

    one(0)  # the graph, compiled once for the class
    one(0)
    before, records = _rss(), len(placement._records)
    for seed in range(1, 21):
        one(seed)
    growth = _rss() - before
    assert growth < 10 << 20, f"host memory grew {growth / 1e6:.1f} MB"
    assert [ref for ref in refs if ref() is not None] == []
    assert len(placement._records) == records
    assert all(
        ref() is None for found in runtime.live_heads() for refs in found.known.values() for ref in refs
    )


def test_nothing_to_offload_is_decided_per_model(offloaded):
    """A model never offloaded is refused alike, alone, beside an offloaded model, and at its
    recompile after that model is restored."""
    plain, other = seeded(Stack), seeded(Nested)
    compiled = torch.compile(plain, backend="offload_inductor")
    with pytest.raises(Exception, match="nothing to offload"):
        compiled(torch.randn(2, 8))
    offloaded(other, ["visual"])
    with torch.no_grad():
        _compiled(other)(torch.randn(2, 8))
    with pytest.raises(Exception, match="nothing to offload"):
        compiled(torch.randn(3, 8))
    fx_offload.restore(other)
    with pytest.raises(Exception, match="nothing to offload") as info:
        compiled(torch.randn(4, 8))
    assert "fx_offload.restore is resident: compile it anew" in str(info.value)


def test_a_graph_without_offloaded_weights_of_an_offloaded_model_compiles(offloaded):
    """A graph break can leave a piece of an offloaded model with resident weights only."""
    from tests.models import Broken

    model = seeded(Broken)
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    offloaded(model, ["first"])
    with torch.no_grad():
        torch.testing.assert_close(_compiled(model, "offload_inductor")(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("patterns", [["layers.*"], ["re:layers\\.[01]"], ["fc1"]])
def test_backend_only_placement_matches_the_users_module_names(patterns):
    model = seeded(Stack, n=3)
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    chosen = {
        "layers.*": lambda n: n.startswith("layers."),
        "re:layers\\.[01]": lambda n: n.startswith(("layers.0.", "layers.1.")),
        "fc1": lambda n: ".fc1." in n,
    }[patterns[0]]
    try:
        with recording() as graphs, torch.no_grad():
            out = _compiled(model, offload=patterns)(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        placed = {n for n, p in model.named_parameters() if placement.lookup(p) is not None}
        assert placed == {n for n, _ in model.named_parameters() if chosen(n)}
        plan = fx_offload.plan_of(model)
        assert plan is not None and {r.names[0] for r in plan.records} == placed
        assert "total offloaded" in str(plan)
        assert plan.outside_graphs() == []
        named = {
            line.split(": ", 1)[1] for g in graphs for line in g.splitlines() if line.startswith("# arg")
        }
        assert named == placed
    finally:
        fx_offload.restore(model)
    assert fx_offload.plan_of(model) is None


def test_components_print_short(offloaded):
    model = seeded(Stack, n=2, dim=64, hidden=128)
    plan = offloaded(model, ["layers"], policy="swap")
    text = repr(plan.components)
    assert text == "(Component('layers', 8 params, 0.1 MB, swap_ins=0),)", text


@pytest.mark.parametrize("before", ["swap", "stream"])
@pytest.mark.parametrize("after", ["swap", "stream"])
def test_the_old_compiled_object_after_offloading_again_with_another_policy(before, after):
    """Offload, compile, call, restore, offload with another policy, call the old object: it runs
    with the new placement, or raises naming torch._dynamo.reset(); it never streams what is
    swapped, and never blames a missing wrapper."""
    model = seeded(Stack, n=2)
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    fx_offload.offload(model, ["layers"], device="cpu", policy=before)
    compiled = _compiled(model)
    try:
        with torch.no_grad():
            compiled(x)
        fx_offload.restore(model)
        plan = fx_offload.offload(model, ["layers"], device="cpu", policy=after)
        with recording() as graphs, torch.no_grad():
            try:
                out = compiled(x)
            except RuntimeError as error:
                assert "torch._dynamo.reset()" in str(error) and "wrapper" not in str(error)
                return
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        if after == "swap":
            assert plan.components[0].swap_ins == 1
        copied = runtime.bytes_copied()
        with torch.no_grad():
            compiled(x)
        assert (runtime.bytes_copied() - copied == 0) == (after == "swap"), graphs
    finally:
        if fx_offload.plan_of(model) is not None:
            fx_offload.restore(model)


def test_a_call_whose_swapped_weights_are_in_place_and_unchanged_does_no_per_parameter_work(
    offloaded, monkeypatch
):
    """The wrapper skips ``Arena.ensure`` (a look at every parameter) when the call passes the
    same weights with the same versions and no other component took their place; a write in
    place, or the other stage swapped in between, still reaches the next call."""
    from fx_offload import swap
    from tests.models import TwoStage

    model, reference = seeded(TwoStage), seeded(TwoStage)
    offloaded(model, ["thinker", "talker"], policy="swap")
    think = torch.compile(model.think, backend="offload_eager")
    talk = torch.compile(model.talk, backend="offload_eager")
    x = torch.randn(3, 8)
    looks = []
    original = swap.Arena.ensure
    monkeypatch.setattr(swap.Arena, "ensure", lambda *args: looks.append(args[1].name) or original(*args))
    with torch.no_grad():
        think(x)
        looks.clear()
        for _ in range(3):
            torch.testing.assert_close(think(x), reference.think(x), rtol=1e-5, atol=1e-6)
        assert looks == []
        for module in (model, reference):
            module.thinker.layers[0].fc1.weight.mul_(2)
        torch.testing.assert_close(think(x), reference.think(x), rtol=1e-5, atol=1e-6)
        assert looks == ["thinker"]
        h = think(x)
        torch.testing.assert_close(talk(h), reference.talk(h), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(think(x), reference.think(x), rtol=1e-5, atol=1e-6)
    assert looks == ["thinker", "talker", "thinker"]
