"""Policies per pattern: ``stream`` (fetched per region, released after it) and ``swap`` (a whole
component moved to the device when a graph that needs it starts, kept until another needs the
room), and ``device_budget``, the bytes swapped components may hold on the device at once."""

import gc
import re
import types
import weakref
from decimal import Decimal

import numpy as np
import pytest
import torch

import fx_offload
from fx_offload import placement, runtime, swap
from fx_offload.explain import recording
from tests.models import Nested, Stack, TwoStage, seeded


def _param_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _compiled_stages(model, backend="offload_inductor", **kwargs):
    think = torch.compile(model.think, backend=backend, **kwargs)
    talk = torch.compile(model.talk, backend=backend, **kwargs)
    return think, talk


def _rounds(model, think, talk, inputs, steps=3):
    """thinker once, talker ``steps`` times, per input; every output compared to ``model``'s."""
    with torch.no_grad():
        for x in inputs:
            h_ref, h = model.think(x), think(x)
            torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
            for _ in range(steps):
                h_ref, h = model.talk(h_ref), talk(h)
                torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)


def test_mapping_of_patterns_to_policies_and_plan_shows_them(offloaded):
    model = seeded(TwoStage)
    plan = offloaded(model, {"visual": "stream", "thinker": "swap", "talker": "swap"})
    text = str(plan)
    assert "policy" in text and "swap" in text and "stream" in text
    assert {c.name for c in plan.components} == {"thinker", "talker"}
    # the most specific pattern decides: visual streams inside the swapped thinker
    visual = {id(p) for p in model.thinker.visual.parameters()}
    for record in plan.records:
        expected = "stream" if id(record.param()) in visual else "swap"
        assert record.policy == expected, record.names
    thinker = next(c for c in plan.components if c.name == "thinker")
    assert thinker.nbytes >= _param_bytes(model.thinker) - _param_bytes(model.thinker.visual)


def test_policy_argument_applies_to_a_list(offloaded):
    model = seeded(TwoStage)
    plan = offloaded(model, ["thinker", "talker"], policy="swap")
    assert all(record.policy == "swap" for record in plan.records)
    assert len(plan.components) == 2


def test_bad_policy_names_the_pattern_and_the_choices():
    model = seeded(TwoStage)
    with pytest.raises(ValueError, match=r"'talker'.*'swapp'.*'stream'.*'swap'"):
        fx_offload.offload(model, {"talker": "swapp"}, device="cpu")
    with pytest.raises(ValueError, match=r"policy.*'stream'.*'swap'"):
        fx_offload.offload(model, ["talker"], policy="fast", device="cpu")
    with pytest.raises(ValueError, match=r"mapping.*policy="):
        fx_offload.offload(model, {"talker": "swap"}, policy="stream", device="cpu")
    assert fx_offload.plan_of(model) is None
    assert not any(isinstance(p, placement.OffloadedParameter) for p in model.parameters())


def test_budget_smaller_than_the_largest_component_is_refused_naming_it():
    model = seeded(TwoStage, dim=8, hidden=64)
    with pytest.raises(ValueError, match=r"device_budget=100 .*'thinker'.* bytes"):
        fx_offload.offload(model, ["thinker", "talker"], policy="swap", device_budget=100, device="cpu")
    with pytest.raises(ValueError, match=r"device_budget.*only to 'swap'"):
        fx_offload.offload(model, ["thinker"], device_budget=1 << 20, device="cpu")
    with pytest.raises(TypeError, match=r"device_budget.*bytes"):
        fx_offload.offload(model, ["talker"], policy="swap", device_budget="1GB", device="cpu")
    for bad in (0, -1):  # the right type, a wrong value
        with pytest.raises(ValueError, match=rf"device_budget must be a positive .*got {bad}"):
            fx_offload.offload(model, ["talker"], policy="swap", device_budget=bad, device="cpu")
    assert fx_offload.plan_of(model) is None
    assert not any(isinstance(p, placement.OffloadedParameter) for p in model.parameters())


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
def test_alternating_stages_cross_once_per_switch_and_stay_correct(backend, offloaded):
    model = seeded(TwoStage)
    plan = offloaded(model, ["thinker", "talker"], policy="swap")  # default budget: one at a time
    assert plan.device_budget == max(c.nbytes for c in plan.components)
    think, talk = _compiled_stages(model, backend)
    _rounds(model, think, talk, [torch.randn(3, 8) for _ in range(3)], steps=4)
    swaps = {c.name: c.swap_ins for c in plan.components}
    assert swaps == {"thinker": 3, "talker": 3}  # once per switch, not once per forward (12)


def _both_fitting(offloaded, model):
    """Offload ``model``'s stages as swapped components under a budget that holds both (their
    ranges' bytes, as a first offload lays them out)."""
    plan = offloaded(model, ["thinker", "talker"], policy="swap")
    budget = sum(c.nbytes for c in plan.components)
    fx_offload.restore(model)
    return offloaded(model, ["thinker", "talker"], policy="swap", device_budget=budget)


def test_a_budget_for_both_keeps_both(offloaded):
    model = seeded(TwoStage)
    plan = _both_fitting(offloaded, model)
    think, talk = _compiled_stages(model)
    _rounds(model, think, talk, [torch.randn(3, 8) for _ in range(3)])
    assert {c.name: c.swap_ins for c in plan.components} == {"thinker": 1, "talker": 1}


def test_once_components_have_landed_a_call_does_not_look_at_them_until_one_moves(offloaded, monkeypatch):
    """The per-call check of a graph's swapped components is a compare of its arena's count of
    swap-ins while nothing came or went there; a swap-in (one at a time: every switch) makes the
    next calls look again, in that model's arena only."""
    looks = []
    resident = swap.Component.resident
    monkeypatch.setattr(swap.Component, "resident", property(lambda c: looks.append(c) or resident.fget(c)))
    both = seeded(TwoStage)
    kept = _both_fitting(offloaded, both).components
    alone = seeded(TwoStage)
    switched = offloaded(alone, ["thinker", "talker"], policy="swap").components  # one at a time
    stages = {model: _compiled_stages(model) for model in (both, alone)}

    def interleaved(rounds):
        for _ in range(rounds):
            for model, (think, talk) in stages.items():
                _rounds(model, think, talk, [torch.randn(3, 8)])

    interleaved(2)  # lands them; then each graph looks once after the last landing
    looks.clear()
    interleaved(2)
    assert [c.swap_ins for c in kept] == [1, 1] and [c.swap_ins for c in switched] == [4, 4]
    assert not any(c in kept for c in looks)
    # after each swap-in, the other stage's first call looks (and finds its component gone)
    assert all(looks.count(c) >= 2 for c in switched), looks
    with torch.no_grad():  # a write is still seen: the versions are read on every call
        both.thinker.layers[0].fc1.weight.mul_(-1)
    _rounds(both, *stages[both], [torch.randn(3, 8)])


@pytest.mark.parametrize("backend", ["offload_eager", "offload_inductor"])
@pytest.mark.parametrize("both_fit", [False, True])
def test_training_through_stages_that_take_turns_gives_the_plain_models_gradients(
    backend, both_fit, offloaded
):
    """The forward saves weights for the backward; with one component at a time, the talker's
    swap-in overwrites the thinker's device range before the thinker's backward runs, so what it
    saves is the parameter, not the range (a saved range gave every thinker gradient wrong)."""
    model, reference = seeded(TwoStage, seed=11), seeded(TwoStage, seed=11)
    plan = (
        _both_fitting(offloaded, model)
        if both_fit
        else offloaded(model, ["thinker", "talker"], policy="swap")
    )
    think, talk = _compiled_stages(model, backend)
    for _ in range(2):
        x = torch.randn(3, 8)
        loss, expected = talk(think(x)).square().mean(), reference.talk(reference.think(x)).square().mean()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        loss.backward()
        expected.backward()
        for (name, param), ours in zip(reference.named_parameters(), model.parameters()):
            torch.testing.assert_close(ours.grad, param.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert [c.swap_ins for c in plan.components] == ([1, 1] if both_fit else [2, 2])


def test_stream_and_swap_in_one_model_and_graph(offloaded):
    model = seeded(TwoStage)
    offloaded(model, {"visual": "stream", "thinker": "swap", "talker": "swap"})
    think, talk = _compiled_stages(model)
    with recording() as graphs:
        _rounds(model, think, talk, [torch.randn(3, 8) for _ in range(2)])
    thinker_graph = next(g for g in graphs if "visual" in g.splitlines()[0])  # "# regions: ..."
    # thinker's swapped weights are only read (under no_grad): their device copies are passed as
    # the graph's inputs, no swap op in the graph (``_rounds`` checks the values)
    assert "fx_offload.swapped" not in thinker_graph and "fx_offload.hold" not in thinker_graph


def test_one_graph_needing_components_that_share_memory_is_refused(offloaded):
    model = seeded(TwoStage)
    offloaded(model, ["thinker", "talker"], policy="swap")

    def both(x):
        return model.talk(model.think(x))

    with pytest.raises(Exception, match=r"'thinker'.*'talker'.*device_budget"):
        with torch.no_grad():
            torch.compile(both, backend="offload_eager")(torch.randn(3, 8))


def test_in_place_update_of_a_swapped_component_is_seen(offloaded):
    model = seeded(TwoStage)
    reference = seeded(TwoStage)
    offloaded(model, ["thinker", "talker"], policy="swap")
    think, talk = _compiled_stages(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        think(x)
        for module in (model, reference):
            module.thinker.layers[0].fc1.weight.mul_(2)
        torch.testing.assert_close(think(x), reference.think(x), rtol=1e-5, atol=1e-6)
        model.load_state_dict(reference.state_dict())  # in place: values change, storage stays
        torch.testing.assert_close(think(x), reference.think(x), rtol=1e-5, atol=1e-6)


def test_swap_survives_state_dict_and_restore():
    model = seeded(TwoStage)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fx_offload.offload(model, {"visual": "stream", "thinker": "swap", "talker": "swap"}, device="cpu")
    think, talk = _compiled_stages(model)
    with torch.no_grad():
        talk(think(torch.randn(3, 8)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fx_offload.restore(model)
    assert not any(isinstance(p, placement.OffloadedParameter) for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_swap_on_a_nested_model_with_a_resident_head(offloaded):
    model = seeded(Nested)
    offloaded(model, {"thinker": "swap"})
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, backend="offload_inductor")(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_swapped_stack_compiled_whole(offloaded):
    model = seeded(Stack)
    plan = offloaded(model, {"layers": "swap"})
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="offload_inductor")
        for _ in range(3):
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    assert [c.swap_ins for c in plan.components] == [1]


class _ReturnsItsWeight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x), self.fc.weight.t()  # a view of the parameter leaves the graph


def _swap_graph_ops(model, patterns, x) -> tuple[list[str], object]:
    """Compile ``model`` with ``patterns`` swapped; the offload ops of its graphs, its output."""
    from fx_offload.explain import format_offload_nodes

    fx_offload.offload(model, patterns, policy="swap")
    compiled = torch.compile(model, backend="offload_inductor")
    with recording(format_offload_nodes) as graphs:
        out = compiled(x)
    return graphs, out


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_a_swapped_component_only_read_is_passed_to_the_graph_as_its_device_copies(grad):
    """Inference graphs that only read a swapped component read their inputs as the resident graph
    does (no ``swapped``/``hold`` op): the wrapper passes the device copies in the parameters'
    place. A training graph keeps the ops: its wrapper must get the parameters themselves."""
    model, plain = seeded(Stack), seeded(Stack)
    x = torch.randn(3, 8)
    with torch.set_grad_enabled(grad):
        graphs, out = _swap_graph_ops(model, ["layers.*"], x)
        torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-6)
    text = "\n".join(graphs)
    if grad:
        assert "swapped(" in text and "hold(" in text, text
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    else:
        assert "swapped(" not in text and "hold(" not in text, text
        assert "(its device copies passed as inputs)" in text
    fx_offload.restore(model)


def test_a_swapped_parameter_written_or_returned_by_the_graph_keeps_the_swap_ops():
    """A write inside forward must reach the parameter (not its device copy), a view returned must
    be the parameter's: those graphs read the component through the ``swapped`` op."""
    from tests.models import SelfWriting

    cases = [(seeded(SelfWriting), seeded(SelfWriting), "body"), (_ReturnsItsWeight(), None, "fc")]
    for model, plain, pattern in cases:
        if plain is None:
            torch.manual_seed(0)
            plain = _ReturnsItsWeight()
            plain.load_state_dict(model.state_dict())
        x = torch.randn(3, 8)
        with torch.no_grad():
            graphs, out = _swap_graph_ops(model, [pattern], x)
            torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-6)
        assert "swapped(" in "\n".join(graphs), graphs
        for (name, p), q in zip(plain.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
        fx_offload.restore(model)


def test_under_cuda_graphs_a_swapped_component_keeps_its_ops():
    """A CUDA graph's replay runs no op: the graph keeps ``swapped``/``hold`` there (the path the
    GPU suite captures), whatever the device (here Inductor skips CUDA graphs for CPU tensors)."""
    from fx_offload.explain import format_offload_nodes

    model, plain = seeded(Stack), seeded(Stack)
    fx_offload.offload(model, ["layers.*"], policy="swap")
    compiled = torch.compile(model, backend="offload_inductor", mode="reduce-overhead")
    x = torch.randn(3, 8)
    with torch.no_grad(), recording(format_offload_nodes) as graphs:
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-6)
    assert "swapped(" in "\n".join(graphs)
    fx_offload.restore(model)


def test_which_reads_of_a_swapped_parameter_the_plan_passes_as_its_device_copy():
    """``graph_plan``'s judgement on Dynamo's graph: a parameter only read is passed as its
    device copy; one written in place (by method, function, op overload, ``out=``, ``inplace=``,
    by keyword or position, item assignment, through a view) or returned as a view is not."""
    import torch.nn.functional as F

    from fx_offload import backend

    cases = {
        "read": (lambda w, x: x @ w.t() + w.sum(), True),
        "method write": (lambda w, x: x @ w.mul_(1), False),
        "function write": (lambda w, x: x @ torch.Tensor.add_(w, 0), False),
        "out=": (lambda w, x: torch.add(w, 0, out=w) @ x, False),
        "inplace=": (lambda w, x: F.relu(w, inplace=True) @ x, False),
        "item assignment": (lambda w, x: (w.__setitem__(0, 0.0), x @ w)[1], False),
        "write through a view": (lambda w, x: (w.view(-1).mul_(1), x @ w)[1], False),
        # Dynamo returns an input itself from outside the graph: the graph only reads it
        "returned itself": (lambda w, x: (x @ w, w), True),
        "view returned": (lambda w, x: (x @ w, w.t()), False),
        "view from a tuple returned": (lambda w, x: (x @ w, w.chunk(2)[0]), False),
        "op overload write": (lambda w, x: x @ torch.ops.aten.mul_.Tensor(w, 1), False),
        "write through a tuple's view": (lambda w, x: (w.chunk(2)[0].mul_(1), x @ w)[1], False),
        "inplace by position": (lambda w, x: F.relu(w, True) @ x, False),
    }
    for name, (fn, passed) in cases.items():
        seen = []

        def capture(gm, inputs, seen=seen):
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            w_at = next(i for i, n in enumerate(placeholders) if n.target == "L_w_")
            seen.append(backend._only_read(placeholders, [w_at]) == {w_at})
            return gm.forward

        w = torch.randn(4, 4)
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(fn, backend=capture, fullgraph=True)(w, torch.randn(4, 4))
        assert seen and seen[0] is passed, name


def test_a_forward_that_turns_grad_on_inside_no_grad_keeps_the_parameters_and_their_gradients():
    """AOTAutograd makes a training graph when an output requires grad, whatever the grad mode at
    the call: such a graph gets the parameters, not their device copies, and fills their grads."""

    class GradInside(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            with torch.enable_grad():
                return self.fc(x)

    model = GradInside()
    fx_offload.offload(model, ["fc"], policy="swap")
    compiled = torch.compile(model, backend="offload_inductor")
    with torch.no_grad():
        out = compiled(torch.randn(3, 8))
    assert out.requires_grad
    out.sum().backward()
    assert model.fc.weight.grad is not None and model.fc.bias.grad is not None
    fx_offload.restore(model)


@pytest.mark.parametrize("policy", ["stream", "swap"])
def test_a_same_shape_view_of_a_weight_across_a_graph_break_is_not_taken_for_the_weight(policy):
    """``w.t()`` of a square weight has the weight's address, shape and dtype: the graph after
    the break must read the view, not the weight (or its device copy)."""

    class Transposes(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            wt = self.fc.weight.t()
            torch._dynamo.graph_break()
            return x @ wt

    model, plain = seeded(Transposes), seeded(Transposes)
    fx_offload.offload(model, ["fc"], policy=policy)
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="offload_inductor")(x), plain(x))
    fx_offload.restore(model)


@pytest.mark.parametrize("policy", ["stream", "swap"])
def test_offload_under_inference_mode_leaves_ordinary_tensors(policy):
    """``offload`` called inside ``torch.inference_mode()`` (as a serving script may): calls and
    in-place writes after it, outside that mode, work (an inference tensor refuses them)."""
    model, plain = seeded(Stack), seeded(Stack)
    with torch.inference_mode():
        fx_offload.offload(model, ["layers.*"], policy=policy)
    compiled = torch.compile(model, backend="offload_inductor")
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-6)
        for m in (model, plain):
            m.layers[0].fc1.weight.mul_(2)
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-6)
    fx_offload.restore(model)


def _in_one_slab(records) -> torch.Tensor:
    """Lay ``records``' host copies out in one slab, as a pinned slab holds them on a GPU (a CPU
    device pins none); return the slab."""
    offsets, nbytes = placement.packed_offsets([r.nbytes for r in records])
    slab = torch.empty(nbytes, dtype=torch.uint8)
    for record, offset in zip(records, offsets):
        host = slab[offset : offset + record.nbytes].view(record.host.dtype).view(record.host.shape)
        record.host = host.copy_(record.host)
    return slab


def test_a_swap_in_copies_each_host_run_whole_in_pieces_cut_between_weights(offloaded, monkeypatch):
    """The arena lays a component out as a pinned slab holds its host copies, so a swap-in copies
    a run of the slab as one piece, or as a few cut between weights near ``swap.PIECE`` bytes (each
    with its own event on a GPU): every weight lands whole, at its view."""
    model = seeded(Stack, n=4, dim=16, hidden=64)
    plan = offloaded(model, ["layers"], policy="swap")
    component = plan.components[0]
    records = component.records
    _in_one_slab(records)
    monkeypatch.setattr(swap, "PIECE", sum(r.nbytes for r in records) // 4)
    component.arena.memory.fill_(255)  # NaN in every float: a weight not copied shows
    component.arena.resident.clear()
    component.arena.ensure(component)
    for record in records:
        assert torch.equal(component.views[id(record)], record.host), record.names
    pieces = component.pieces[1]
    lasts = [last for last, _, _ in pieces]
    assert lasts == sorted(lasts) and lasts[-1] == len(records) - 1
    assert 3 <= len(lasts) <= 5  # about a block each
    # one slab, one run: each piece is one copy of its bytes, not one per weight
    assert [len(targets) for _, targets, _ in pieces] == [1] * len(pieces)
    assert sum(targets[0].nbytes for _, targets, _ in pieces) >= sum(r.nbytes for r in records)
    with torch.no_grad():
        compiled = torch.compile(model, backend="offload_inductor")
        x = torch.randn(3, 16)
        reference = seeded(Stack, n=4, dim=16, hidden=64)
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("replaced", [0, 1])
def test_a_swap_in_skips_a_replaced_modules_weights_and_keeps_no_host_copy(offloaded, replaced):
    """A swapped module's submodule replaced: the new one runs resident, the old one's host copy goes
    with it, and the component's other weights still land at their views (their places were fixed
    with the arena, not laid out again without the replaced weights)."""
    model = seeded(Stack, n=2, dim=16, hidden=64)
    reference = seeded(Stack, n=2, dim=16, hidden=64)
    component = offloaded(model, ["layers"], policy="swap").components[0]
    gone = [r for r in component.records if r.names[0].startswith(f"layers.{replaced}.")]
    slab = weakref.ref(_in_one_slab(gone).untyped_storage())  # a slab per block, as on a GPU
    _in_one_slab([r for r in component.records if r not in gone])
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled = torch.compile(model, backend="offload_inductor")
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)
        model.layers[replaced] = reference.layers[replaced]
        gc.collect()
        assert slab() is None  # freed with its module: the swap-in's pieces hold no host copy
        component.arena.memory.fill_(255)  # NaN in every float: a weight not copied shows
        for _ in range(2):
            component.arena.resident.clear()  # swapped in again
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)
    _assert_live_weights_landed(component)


def test_a_replaced_weight_between_two_that_lie_together_in_host_memory_keeps_their_places(offloaded):
    """Two live weights one after another in a host allocation, a replaced one between them in the
    component: each lands at its own view, not as one copy across the replaced one's place."""
    model = seeded(Stack, n=3, dim=16, hidden=64)
    reference = seeded(Stack, n=3, dim=16, hidden=64)
    component = offloaded(model, ["layers"], policy="swap").components[0]
    middle = [r for r in component.records if r.names[0].startswith("layers.1.")]
    _in_one_slab(middle)
    _in_one_slab([r for r in component.records if r not in middle])  # blocks 0 and 2 adjacent
    model.layers[1] = reference.layers[1]
    gc.collect()
    component.arena.memory.fill_(255)  # NaN in every float: a weight not copied shows
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled = torch.compile(model, backend="offload_inductor")
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)
    _assert_live_weights_landed(component)


def _assert_live_weights_landed(component) -> None:
    """Each live weight of ``component`` landed in its place in the arena with its host values."""
    for record in component.records:
        if record.param() is not None:
            assert torch.equal(component.views[id(record)], record.host), record.names


class _TwoBroken(torch.nn.Module):
    """Two stacks whose blocks Dynamo compiles as graphs of their own (a graph break after each)."""

    def __init__(self, n: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.first, self.second = Stack(n, dim, hidden), Stack(n, dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stack in (self.first, self.second):
            for layer in stack.layers:
                x = layer(x)
                torch._dynamo.graph_break()
        return x


def test_while_a_swap_in_lands_each_call_waits_for_the_pieces_it_reads(offloaded, monkeypatch):
    """The landing on a GPU, its events stood in for by names (a CPU copies at once): each block's
    graph waits for the piece that holds its weights, no sooner and no twice, whether its call
    takes the kept check (the same weights as before) or not."""
    model = seeded(_TwoBroken, n=4, dim=16, hidden=64)
    plan = offloaded(model, ["first.layers", "second.layers"], policy="swap")  # both land per forward
    component = plan.components[0]
    monkeypatch.setattr(swap, "PIECE", sum(r.nbytes for r in component.records) // 4)  # a block each
    land, waited = swap.Arena._land, []

    def land_late(arena, landed):
        land(arena, landed)
        landed.landing = [(last, f"{landed.name} {i}") for i, (last, _, _) in enumerate(landed.pieces[1])]
        landed.landed_on, landed.landed_to = None, -1

    device = runtime.device_runtime(torch.device("cpu"))
    monkeypatch.setattr(swap.Arena, "_land", land_late)
    monkeypatch.setattr(device, "compute_stream", lambda: types.SimpleNamespace(stream_id=1))
    monkeypatch.setattr(runtime, "wait_event", lambda event, stream: waited.append(event))
    compiled = torch.compile(model, backend="offload_inductor")
    reference = seeded(_TwoBroken, n=4, dim=16, hidden=64)
    x = torch.randn(3, 16)
    with torch.no_grad():
        for _ in range(3):
            waited.clear()
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)
            # one wait per block, in turn, in each stack
            assert waited == [f"{name}.layers {i}" for name in ("first", "second") for i in range(4)], waited
            assert [c.landing for c in plan.components] == [[], []]
    assert {c.name: c.swap_ins for c in plan.components} == {"first.layers": 3, "second.layers": 3}


def test_a_capture_while_a_swap_in_lands_waits_for_all_of_it_and_notes_nothing(offloaded, monkeypatch):
    """A CUDA graph captured while a component lands waits, at its replays, for the whole copy; the
    compute stream waited for nothing meanwhile, so the calls after the capture still wait for
    their pieces (the events stood in for by names, as above)."""
    model = seeded(Stack, n=4, dim=16, hidden=64)
    component = offloaded(model, ["layers"], policy="swap").components[0]
    device, waited, capturing = runtime.device_runtime(torch.device("cpu")), [], [True]
    monkeypatch.setattr(device, "device", types.SimpleNamespace(type="cuda"))
    monkeypatch.setattr(device, "compute_stream", lambda: types.SimpleNamespace(stream_id=1))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(runtime, "wait_event", lambda event, stream: waited.append(event))
    component.landing, component.landed_on, component.landed_to = [(3, "piece 0"), (15, "piece 1")], None, -1
    swap.Arena.wait_for(component, 1)
    assert waited == ["piece 1"] and len(component.landing) == 2 and component.landed_to == -1
    capturing[0] = False
    swap.Arena.wait_for(component, 1)
    assert waited == ["piece 1", "piece 0"] and component.landing == [(15, "piece 1")]


def test_a_module_collected_while_a_swap_in_is_made_is_left_out(offloaded, monkeypatch):
    """A replaced submodule in a reference cycle dies at a collection, which can run while a
    swap-in gathers its host copies: the swap-in starts again without it."""
    model = seeded(Stack, n=2, dim=16, hidden=64)
    reference = seeded(Stack, n=2, dim=16, hidden=64)
    component = offloaded(model, ["layers"], policy="swap").components[0]
    component.arena.ensure(component)  # its pieces made for this placement generation
    old = model.layers[1]
    old.itself = [old]  # a cycle: only the collector frees it
    model.layers[1] = reference.layers[1]
    del old
    host_of, collected = swap._host, []

    def collect_first(record, nbytes):
        if not collected:
            collected.append(gc.collect())
        return host_of(record, nbytes)

    monkeypatch.setattr(swap, "_host", collect_first)
    component.arena.resident.clear()
    component.arena.ensure(component)
    assert collected and collected[0] > 0
    with torch.no_grad():
        x = torch.randn(3, 16)
        torch.testing.assert_close(torch.compile(model, backend="offload_inductor")(x), reference(x))


def test_a_streamed_modules_norms_and_biases_stay_on_the_device(offloaded):
    """``keep_vectors``: a streamed module's 1-D parameters stay resident when they are a small part
    of it (here 1.2% of the blocks' bytes); they survive compile, state_dict and restore."""
    model = seeded(Stack, n=4, dim=64, hidden=128)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = offloaded(model, ["layers"])
    biases = {f"layers.{i}.{fc}.bias" for i in range(4) for fc in ("fc1", "fc2")}
    assert set(plan.kept) == biases
    assert plan.kept_bytes == 4 * (128 + 64) * 4
    assert {name for record in plan.records for name in record.names} == {
        f"layers.{i}.{fc}.weight" for i in range(4) for fc in ("fc1", "fc2")
    }
    params = dict(model.named_parameters())
    assert all(placement.lookup(params[name]) is None for name in biases)
    assert plan.resident_bytes == _param_bytes(model.out) + plan.kept_bytes
    assert "kept on cpu: 8 1-D parameters" in str(plan)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="offload_inductor")(x), expected)
    torch.testing.assert_close(model.state_dict(), state)
    fx_offload.restore(model)
    torch.testing.assert_close(model.state_dict(), state)
    assert not any(placement.is_kept(p) for p in model.parameters())


def test_keep_vectors_bounds_what_stays(offloaded):
    """``0`` streams every parameter; a module whose 1-D parameters are more than the fraction of
    it, or all it has (a norm alone), streams them too."""
    wide = seeded(Stack, n=4, dim=64, hidden=128)
    assert offloaded(wide, ["layers"], keep_vectors=0).kept == ()
    narrow = seeded(Stack)  # dim 8: the biases are 8% of the blocks' bytes
    assert offloaded(narrow, ["layers"]).kept == ()
    nested = seeded(Nested)
    plan = offloaded(nested, ["thinker.norm"])  # a LayerNorm alone: its weight and bias are all it has
    assert plan.kept == () and len(plan.records) == 2


def test_bad_keep_vectors_is_refused_before_anything_moves():
    model = seeded(Stack, n=4, dim=64, hidden=128)
    bad_values = [(True, TypeError), ("0.05", TypeError), (Decimal("0.05"), TypeError), (-0.1, ValueError)]
    for bad, error in [*bad_values, (2, ValueError), (float("nan"), ValueError)]:
        with pytest.raises(error, match=rf"keep_vectors must be a fraction .*got {re.escape(repr(bad))}"):
            fx_offload.offload(model, ["layers"], keep_vectors=bad, device="cpu")
    assert fx_offload.plan_of(model) is None
    assert not any(isinstance(p, placement.OffloadedParameter) for p in model.parameters())
    plan = fx_offload.offload(model, ["layers"], keep_vectors=np.float32(0.05), device="cpu")  # any real
    try:
        assert type(plan.keep_vectors) is float and plan.kept
        with pytest.raises(ValueError, match=r"already offloaded .*\(keep_vectors=0.05"):
            fx_offload.offload(model, ["layers"], keep_vectors=0, device="cpu")
    finally:
        fx_offload.restore(model)


def test_the_backend_option_streams_every_parameter():
    """``options={"offload": ...}`` places per graph, where a module's bytes are not known: it keeps
    nothing, and ``plan_of`` says so."""
    model = seeded(Stack, n=4, dim=64, hidden=128)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, backend="offload_inductor", options={"offload": ["layers"]})(x)
    torch.testing.assert_close(got, expected)
    plan = fx_offload.plan_of(model)
    try:
        assert plan.kept == () and plan.keep_vectors == 0 and len(plan.records) == 16
    finally:
        fx_offload.restore(model)
