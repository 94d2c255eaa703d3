"""The offload pass costs time linear in the graph: no step rescans the graph per region.

A pass that recomputed node order, searched for barriers or looked for the fake mode over the
whole graph once per region made a 36-layer model's compile take minutes. Counting the nodes the
pass visits (every walk over ``graph.nodes``) measures that without timing: doubling the regions
of a long synthetic graph must about double the count, where a per-region walk quadruples it.
"""

from unittest import mock

import pytest
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from fx_offload.options import AUTO
from fx_offload.regions import GraphPlan
from fx_offload.rewrite import rewrite


def _layers(count: int, device: str, barrier_every: int) -> tuple[fx.Graph, GraphPlan]:
    """``count`` offloaded layers of three ``mm``s each (as a post-grad graph records them, with
    fake values and module stacks), a resident op between layers and, every ``barrier_every``
    layers, a round trip through host memory (a barrier on a CUDA graph)."""
    mode = FakeTensorMode()
    with mode:
        act, weight = torch.empty(4, 8, device=device), torch.empty(8, 8, device=device)
        host = torch.empty(4, 8)
    graph = fx.Graph()
    weights = []
    for i in range(3 * count):
        weights.append(graph.placeholder(f"w{i}"))
        weights[-1].meta["val"] = weight
    x = graph.placeholder("x")
    x.meta["val"] = act

    def call(target, args, value, stack=None, **kwargs):
        node = graph.call_function(target, args, kwargs)
        node.meta["val"] = value
        if stack:
            node.meta["nn_module_stack"] = stack
        return node

    for layer in range(count):
        stack = {f"{1000 + layer}": (f"L['self'].layers[{layer}]", "Layer")}
        for j in range(3):
            t = call(torch.ops.aten.t.default, (weights[3 * layer + j],), weight, stack)
            x = call(
                torch.ops.aten.relu.default,
                (call(torch.ops.aten.mm.default, (x, t), act, stack),),
                act,
                stack,
            )
        x = call(torch.ops.aten.sin.default, (x,), act)
        if barrier_every and layer % barrier_every == barrier_every - 1:
            x = call(torch.ops.aten._to_copy.default, (x,), host, device=torch.device("cpu"))
            x = call(torch.ops.aten._to_copy.default, (x,), act, device=torch.device(device))
    graph.output((x,))
    offloaded = {i: f"layers.{i // 3}.w{i % 3}" for i in range(3 * count)}
    modules = frozenset(f"{1000 + layer}" for layer in range(count))
    plan = GraphPlan(
        offloaded, modules, prefetch=3, device_type=device, prefetch_head=2, refill_in_graph=AUTO
    )
    return graph, plan


def _visits(graph: fx.Graph, plan: GraphPlan) -> int:
    """How many nodes ``rewrite`` visits walking the graph's node list (either way)."""
    nodes = type(graph.nodes)
    count = 0

    def counting(walk):
        def visit(self):
            nonlocal count
            for node in walk(self):
                count += 1
                yield node

        return visit

    with (
        mock.patch.object(nodes, "__iter__", counting(nodes.__iter__)),
        mock.patch.object(nodes, "__reversed__", counting(nodes.__reversed__)),
    ):
        regions = rewrite(graph, plan)
    assert len(regions) == len(plan.region_modules)
    return count


@pytest.mark.parametrize(
    "device,barrier_every",
    [("cpu", 0), ("cuda", 0), ("cuda", 10)],  # heads (no barrier); fetches held back by barriers
    ids=["cpu-heads", "cuda-heads", "cuda-barriers"],
)
def test_pass_walks_the_graph_a_bounded_number_of_times(device, barrier_every):
    small = _visits(*_layers(60, device, barrier_every))
    large = _visits(*_layers(120, device, barrier_every))
    # linear: 2x the regions, 2x the visits; one walk per region would make it 4x
    assert large < 2.5 * small, (small, large)


def test_inductor_lowers_the_ops_without_printing_their_arguments(monkeypatch):
    """Inductor lowers an op it has no lowering for through an implicit fallback, and logs the op
    with its arguments first: torch 2.11 builds that text whatever the log level, and the text of
    an argument recurses through every IR node it depends on. For the ops of a 36-layer decoder,
    whose tokens tie each region to the last, that took minutes (a generate() warm-up that did
    not end). The pass gives Inductor the ops' fallbacks itself, so no op of ours reaches that
    path: with the log on, no fx_offload op's arguments are ever turned to text."""
    import logging

    from torch._inductor import exc, lowering

    import fx_offload
    from fx_offload import ops
    from tests.models import Stack

    printed = []
    text = exc.OperatorIssue.operator_str

    def recording(target, args, kwargs):
        printed.append(target)
        return text(target, args, kwargs)

    monkeypatch.setattr(exc.OperatorIssue, "operator_str", staticmethod(recording))
    for op in ops.ALL:  # as in a process that has compiled nothing yet
        monkeypatch.delitem(lowering.lowerings, op, raising=False)

    class Formatting(logging.Handler):  # formats each record, as any handler that prints does
        def emit(self, record):
            self.format(record)

    logger, handler = logging.getLogger("torch._inductor.graph"), Formatting()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        torch._dynamo.reset()
        model = Stack(4)
        expected = model(torch.ones(2, 8))
        fx_offload.offload(model, ["layers.*"], device="cpu")
        got = torch.compile(model, backend="offload_inductor")(torch.ones(2, 8))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected)
    assert not [t for t in printed if t.namespace == "fx_offload"], printed


@pytest.mark.parametrize("heads", [False, 1], ids=["fetched", "heads"])
def test_offloaded_layers_compile_the_resident_models_kernels(heads):
    """Inductor builds the same kernels for the model with layers offloaded as for the model
    resident. An op that read a reader's output, or declared that it wrote the buffers a reader
    read (Inductor then counts it as one more reader of every reader's output), kept the
    offloaded layers' ReLU from overwriting its input in place: one more kernel variant per such
    op, each one more kernel to compile (most of offloading's cost in compile time)."""
    import re

    from torch._inductor.utils import run_and_get_code

    import fx_offload
    from tests.models import Stack

    def kernels(model, backend, options=None):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, options=options)
        out, code = run_and_get_code(compiled, torch.ones(2, 8))
        return out, sorted(set(re.findall(r"(cpp_fused_\w+) = async_compile", "\n".join(code))))

    model = Stack(4)
    expected, resident = kernels(model, "inductor")
    fx_offload.offload(model, ["layers.1", "layers.2"], device="cpu")
    got, offloaded = kernels(model, "offload_inductor", {"prefetch_head": heads})
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected)
    assert offloaded == resident
