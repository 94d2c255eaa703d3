"""Nothing the user gave is lost: values survive offload, compile, restore and state_dict."""

import pytest
import torch

import fx_offload
from fx_offload import placement
from tests.models import Nested, Stack, Tied, seeded


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_parameters_keep_identity_and_values_after_offload():
    model = seeded(Nested)
    before = _state(model)
    params = dict(model.named_parameters())
    fx_offload.offload(model, ["visual"], device="cpu")
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    _assert_same_state(_state(model), before)
    fx_offload.restore(model)


def test_state_dict_survives_offload_compile_run_and_restore():
    model = seeded(Stack)
    before = _state(model)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    with torch.no_grad():
        torch.compile(model, backend="offload_eager")(torch.randn(2, 8))
    _assert_same_state(_state(model), before)
    fx_offload.restore(model)
    _assert_same_state(_state(model), before)
    assert all(placement.lookup(p) is None for p in model.parameters())
    assert fx_offload.plan_of(model) is None


def test_restore_of_a_model_never_offloaded_raises():
    model = seeded(Stack)
    try:
        fx_offload.restore(model)
    except ValueError as error:
        assert "nothing to restore" in str(error)
    else:
        raise AssertionError("restore accepted a model that was never offloaded")


def test_tied_weights_stay_tied_through_offload_and_restore():
    model = seeded(Tied)
    fx_offload.offload(model, ["embed"], device="cpu")
    assert model.embed.weight is model.lm_head.weight
    fx_offload.restore(model)
    assert model.embed.weight is model.lm_head.weight


def test_in_place_write_after_offload_is_seen_by_the_next_compiled_call():
    model = seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    compiled = torch.compile(model, backend="offload_eager")
    x = torch.randn(2, 8)
    with torch.no_grad():
        compiled(x)
        model.layers[1].fc1.weight.mul_(2)
        expected = model(x)
        assert torch.equal(compiled(x), expected)
    fx_offload.restore(model)


def test_cpu_offload_keeps_one_copy_of_the_values():
    model = seeded(Stack)
    weight = model.layers[0].fc1.weight
    address = weight.data_ptr()
    fx_offload.offload(model, ["layers"], device="cpu")
    assert weight.data_ptr() == address  # host and device are the same memory on the CPU
    fx_offload.restore(model)


def test_in_place_write_to_the_first_region_is_seen_despite_its_prefetched_copy():
    model = seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    compiled = torch.compile(model, backend="offload_eager")
    x = torch.randn(2, 8)
    with torch.no_grad():
        compiled(x)  # the first region (layers.0) is now refilled for the next call
        model.layers[0].fc1.weight.mul_(-1)
        expected = model(x)
        assert torch.equal(compiled(x), expected)
        model.load_state_dict(seeded(Stack, seed=1).state_dict())
        assert torch.equal(compiled(x), model(x))
    fx_offload.restore(model)


def _trained_normed():
    from tests.models import Normed

    model = seeded(Normed).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 8) * 3 + 1)  # running statistics away from their defaults
    return model.eval()


@pytest.mark.parametrize("device", ["meta", "xla", "mps"])
def test_an_unsupported_device_raises_naming_it_and_keeps_every_buffer(device):
    model = _trained_normed()
    before = _state(model)
    with pytest.raises(ValueError, match=f"device '{device}' is not supported"):
        fx_offload.offload(model, ["*"], device=device)
    with pytest.raises(ValueError, match=f"device '{device}' is not supported"):
        fx_offload.offload(model, ["body"], device=device)
    _assert_same_state(_state(model), before)
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert fx_offload.plan_of(model) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable GPU")
def test_cuda_without_a_gpu_raises_naming_it_and_keeps_every_buffer():
    model = _trained_normed()
    before = _state(model)
    with pytest.raises(ValueError, match="device 'cuda' .*no GPU.*device='cpu'"):
        fx_offload.offload(model, ["body"], device="cuda")
    _assert_same_state(_state(model), before)


@pytest.mark.parametrize("policy", ["stream", "swap"])
def test_deepcopy_of_an_offloaded_model_is_a_plain_resident_model_and_the_original_stays_offloaded(policy):
    import copy

    plain, model = seeded(Stack), seeded(Stack)
    fx_offload.offload(model, ["layers.*"], device="cpu", policy=policy)
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = plain(x)
        compiled = torch.compile(model, backend="offload_eager")
        assert torch.equal(compiled(x), expected)
        twin = copy.deepcopy(model)
        assert all(type(p) is torch.nn.Parameter and placement.lookup(p) is None for p in twin.parameters())
        assert not {p.data_ptr() for p in twin.parameters()} & {p.data_ptr() for p in model.parameters()}
        _assert_same_state(_state(twin), _state(plain))
        assert torch.equal(torch.compile(twin, backend="eager")(x), expected)
        with pytest.raises(ValueError, match="nothing to restore"):
            fx_offload.restore(twin)  # it was never offloaded
        fx_offload.offload(twin, ["layers"], device="cpu", policy=policy)  # on its own
        torch._dynamo.reset()  # graphs shared across models of one class are another matter
        assert torch.equal(torch.compile(twin, backend="offload_eager")(x), expected)
        fx_offload.restore(twin)
        assert torch.equal(compiled(x), expected)  # the original is untouched
    assert all(placement.lookup(p) is not None for p in model.layers.parameters())
    fx_offload.restore(model)
    _assert_same_state(_state(model), _state(plain))


def test_a_parameter_dropped_during_a_trace_releases_its_host_copy_cleanly(monkeypatch):
    """The release runs in a finalizer, which may fire while Dynamo traces under a fake mode."""
    import sys

    from torch._subclasses.fake_tensor import FakeTensorMode

    raised = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: raised.append(info.exc_value))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    plan = fx_offload.offload(model, ["0"], device="cpu")
    old = model[0]
    model[0] = torch.nn.Linear(4, 4)
    with FakeTensorMode():
        del old  # its parameters die here, inside the fake mode
    assert raised == []
    assert all(record.host.numel() == 0 for record in plan.records if record.param() is None)
    fx_offload.restore(model)


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_a_pin_memory_that_is_no_bool_raises_naming_it(bad):
    model = seeded(Stack)
    with pytest.raises(TypeError, match=rf"pin_memory must be True, False or None .* got {bad!r}"):
        fx_offload.offload(model, ["layers.0"], device="cpu", pin_memory=bad)
    assert all(placement.lookup(p) is None for p in model.parameters())
