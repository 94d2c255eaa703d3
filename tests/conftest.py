import pytest
import torch

import fx_offload
from fx_offload import runtime


@pytest.fixture(autouse=True, scope="session")
def _no_compile_caches():
    """A warm on-disk cache would skip the pass that the tests inspect."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch; released buffers are poisoned so late readers show."""
    torch._dynamo.reset()
    runtime.poison_released_buffers(True)
    yield
    runtime.poison_released_buffers(False)
    torch._dynamo.reset()


@pytest.fixture
def offloaded():
    """Offload a model and restore it at the end of the test, whatever happens."""
    models = []

    def make(model, patterns, **kwargs):
        plan = fx_offload.offload(model, patterns, device="cpu", **kwargs)
        models.append(model)
        return plan

    yield make
    for model in models:
        if fx_offload.plan_of(model) is not None:
            fx_offload.restore(model)
