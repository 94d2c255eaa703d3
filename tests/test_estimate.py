"""``refill_in_graph='auto'``: the bytes a graph's tail hides, from a roofline of its matmuls."""

from unittest import mock

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fx_offload
from fx_offload import estimate, runtime
from tests.models import Stack, seeded

# round figures: 1 GFLOP/s, 1 GB/s device memory, 0.1 GB/s host to device
FIGURES = estimate.DeviceFigures({torch.float32: 1e9}, 1e9, 1e8)


def test_a_matmul_costs_the_slower_of_its_flops_and_its_bytes_plus_a_launch():
    def f(a, b):
        return torch.relu(torch.mm(a, b))  # the relu is not FLOP-counted: fused, not timed

    graph = make_fx(f, tracing_mode="fake")(torch.randn(64, 128), torch.randn(128, 256)).graph
    flops = 2 * 64 * 128 * 256  # 4.19e6: 4.19 ms at 1 GFLOP/s
    nbytes = (64 * 128 + 128 * 256 + 64 * 256) * 4  # 229 KB: 0.23 ms at 1 GB/s
    assert estimate.tail_seconds(graph.nodes, FIGURES) == pytest.approx(
        flops / 1e9 + estimate.KERNEL_OVERHEAD_S
    )
    memory_bound = estimate.DeviceFigures({torch.float32: 1e12}, 1e9, 1e8)
    assert estimate.tail_seconds(graph.nodes, memory_bound) == pytest.approx(
        nbytes / 1e9 + estimate.KERNEL_OVERHEAD_S
    )
    assert estimate.tail_bytes(graph.nodes, FIGURES) == int(
        estimate.MARGIN * (flops / 1e9 + estimate.KERNEL_OVERHEAD_S) * 1e8
    )


def test_symbolic_shapes_are_timed_at_their_hints():
    def f(a, b):
        return torch.mm(a, b)

    inputs = torch.randn(64, 128), torch.randn(128, 256)
    symbolic = make_fx(f, tracing_mode="symbolic")(*inputs).graph
    assert any(  # the graph's sizes are symbols, as in a graph Dynamo compiled for dynamic shapes
        isinstance(size, torch.SymInt) for node in symbolic.nodes for size in node.meta["val"].shape
    )
    fake = make_fx(f, tracing_mode="fake")(*inputs).graph
    assert estimate.tail_seconds(symbolic.nodes, FIGURES) == estimate.tail_seconds(fake.nodes, FIGURES)


def _split(rows: int, figures, dynamic: bool | None = None) -> list[int]:
    """The in-call bytes of each head of a 4-block Stack (two heads of 1120 bytes) run on
    ``rows`` rows, where the device has ``figures``, compiled with ``dynamic``."""
    torch._dynamo.reset()
    model = seeded(Stack, n=4)
    fx_offload.offload(model, ["layers.*"], device="cpu")
    try:
        with mock.patch.object(estimate, "device_figures", lambda device_type: figures), torch.no_grad():
            # the heads' refill ops, whose in-graph part 'auto' estimates (as under CUDA graphs)
            options = {"prefetch": 3, "prefetch_head": 2, "heads_as_inputs": False}
            compiled = torch.compile(model, backend="offload_eager", options=options, dynamic=dynamic)
            x = torch.randn(rows, 8)
            torch.testing.assert_close(compiled(x), compiled(x))
            return [found.in_graph for found in runtime.live_heads()]
    finally:
        fx_offload.restore(model)
        torch._dynamo.reset()


def test_auto_copies_in_the_call_what_the_tail_hides_and_at_most_the_heads():
    assert _split(2, None) == [1120, 1120]  # no figures (a CPU): the whole heads
    light = sum(_split(2, FIGURES))
    heavy = sum(_split(64, FIGURES))
    assert 0 < light < heavy, (light, heavy)  # more tail compute hides more bytes
    assert _split(2, estimate.DeviceFigures({torch.float32: 1e9}, 1e9, 1e12)) == [1120, 1120]


def test_a_graph_compiled_for_dynamic_shapes_is_estimated():
    assert 0 < sum(_split(2, FIGURES, dynamic=True)) < 2 * 1120


def test_a_cpu_has_no_figures():
    assert estimate.device_figures("cpu") is None
