"""``rewrite(graph, plan)`` alone, on FX graphs built by hand (regenerate with EXPECTTEST_ACCEPT=1).

The graphs carry what the pass reads in a graph after AOTAutograd: placeholders with fake
tensors in ``meta["val"]``, and ``meta["nn_module_stack"]`` on each op (keys standing for module
ids, ``@1`` for a module's second call, paths as Dynamo writes them). Each block ``layers.i``
computes ``relu(addmm(bias_i, x, t(weight_i)))``. The snapshots are ``format_offload_nodes``:
the pass's nodes in graph order, then the reads each region's fetched tensors serve.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from expecttest import TestCase
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import fx_offload  # noqa: F401  (registers the fx_offload ops)
from fx_offload.explain import format_offload_nodes
from fx_offload.regions import GraphPlan
from fx_offload.rewrite import rewrite

aten = torch.ops.aten


class Builder:
    """An AOT-like FX graph, built op by op, and the plan that offloads its marked parameters."""

    def __init__(self, device: str = "cpu") -> None:
        self.graph = fx.Graph()
        self.device = device
        self.fake = FakeTensorMode(allow_non_fake_inputs=False)
        self.offloaded: dict[int, str] = {}
        self.modules: dict[str, str] = {}  # module path -> its nn_module_stack key
        self.placeholders = 0

    def input(self, *shape: int, offloaded: str | None = None) -> fx.Node:
        assert all(n.op == "placeholder" for n in self.graph.nodes), "inputs come first, as in AOT graphs"
        node = self.graph.placeholder(f"arg{self.placeholders}_1")
        with self.fake:
            node.meta["val"] = torch.empty(shape, device=self.device)
        if offloaded is not None:
            self.offloaded[self.placeholders] = offloaded
        self.placeholders += 1
        return node

    def call(self, target, *args, module: str | None = None, call: int = 0, **kwargs) -> fx.Node:
        name = target.overloadpacket.__name__  # named as AOTAutograd names them: t, t_1, addmm
        node = self.graph.create_node("call_function", target, args, kwargs, name=name)
        values = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        with self.fake:
            node.meta["val"] = target(*values[0], **values[1])
        if module is not None:
            key = self.modules.setdefault(module, str(1000 + len(self.modules)))
            path = "L['self']" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in module.split("."))
            node.meta["nn_module_stack"] = {key + (f"@{call}" if call else ""): (path, torch.nn.Module)}
        return node

    def block(self, x: fx.Node, weight: fx.Node, bias: fx.Node, module: str, call: int = 0) -> fx.Node:
        t = self.call(aten.t.default, weight, module=module, call=call)
        y = self.call(aten.addmm.default, bias, x, t, module=module, call=call)
        return self.call(aten.relu.default, y, module=module, call=call)

    def params(self, module: str) -> tuple[fx.Node, fx.Node]:
        weight = self.input(8, 8, offloaded=f"{module}.weight")
        return weight, self.input(8, offloaded=f"{module}.bias")

    def finish(self, *outputs: fx.Node, **plan) -> str:
        self.graph.output(tuple(outputs))
        plan.setdefault("device_type", self.device)
        plan = GraphPlan(self.offloaded, frozenset(self.modules.values()), **plan)
        self.gm = fx.GraphModule(torch.nn.Module(), self.graph)
        regions = rewrite(self.gm.graph, plan)
        return format_offload_nodes(self.gm, plan, regions)


def chain(n: int = 3, **plan) -> str:
    """``n`` offloaded blocks in a row."""
    b = Builder()
    x = b.input(2, 8)
    params = [b.params(f"layers.{i}") for i in range(n)]
    for i, (weight, bias) in enumerate(params):
        x = b.block(x, weight, bias, f"layers.{i}")
    return b.finish(x, **plan)


class RewriteSnapshots(TestCase):
    def test_chain_prefetch_0_fetches_each_region_after_the_release_of_the_one_before(self):
        self.assertExpectedInline(
            chain(prefetch=0, prefetch_head=0),
            """\
fetch = fetch('layers.0', [layers.0.weight, layers.0.bias], after=[])
wait = wait('layers.0', fetched..fetched_1, issued=[])
release = release('layers.0', fetched..fetched_1, readers=[addmm])
fetch_1 = fetch('layers.1', [layers.1.weight, layers.1.bias], after=[release])
wait_1 = wait('layers.1', fetched_2..fetched_3, issued=[])
release_1 = release('layers.1', fetched_2..fetched_3, readers=[addmm_1])
fetch_2 = fetch('layers.2', [layers.2.weight, layers.2.bias], after=[release_1])
wait_2 = wait('layers.2', fetched_4..fetched_5, issued=[])
release_2 = release('layers.2', fetched_4..fetched_5, readers=[addmm_2])
reads of layers.0:
  t <- fetched (layers.0.weight)
  addmm <- fetched_1 (layers.0.bias)
reads of layers.1:
  t_1 <- fetched_2 (layers.1.weight)
  addmm_1 <- fetched_3 (layers.1.bias)
reads of layers.2:
  t_2 <- fetched_4 (layers.2.weight)
  addmm_2 <- fetched_5 (layers.2.bias)""",
        )

    def test_chain_prefetch_1_fetches_one_region_ahead(self):
        self.assertExpectedInline(
            chain(prefetch=1, prefetch_head=0),
            """\
fetch = fetch('layers.0', [layers.0.weight, layers.0.bias], after=[])
fetch_1 = fetch('layers.1', [layers.1.weight, layers.1.bias], after=[])
wait = wait('layers.0', fetched..fetched_1, issued=[fetched_2])
release = release('layers.0', fetched..fetched_1, readers=[addmm])
fetch_2 = fetch('layers.2', [layers.2.weight, layers.2.bias], after=[release])
wait_1 = wait('layers.1', fetched_2..fetched_3, issued=[fetched_4])
release_1 = release('layers.1', fetched_2..fetched_3, readers=[addmm_1])
wait_2 = wait('layers.2', fetched_4..fetched_5, issued=[])
release_2 = release('layers.2', fetched_4..fetched_5, readers=[addmm_2])
reads of layers.0:
  t <- fetched (layers.0.weight)
  addmm <- fetched_1 (layers.0.bias)
reads of layers.1:
  t_1 <- fetched_2 (layers.1.weight)
  addmm_1 <- fetched_3 (layers.1.bias)
reads of layers.2:
  t_2 <- fetched_4 (layers.2.weight)
  addmm_2 <- fetched_5 (layers.2.bias)""",
        )

    def test_chain_prefetch_2_fetches_all_three_at_the_start(self):
        self.assertExpectedInline(
            chain(prefetch=2, prefetch_head=0),
            """\
fetch = fetch('layers.0', [layers.0.weight, layers.0.bias], after=[])
fetch_1 = fetch('layers.1', [layers.1.weight, layers.1.bias], after=[])
fetch_2 = fetch('layers.2', [layers.2.weight, layers.2.bias], after=[])
wait = wait('layers.0', fetched..fetched_1, issued=[fetched_2, fetched_4])
release = release('layers.0', fetched..fetched_1, readers=[addmm])
wait_1 = wait('layers.1', fetched_2..fetched_3, issued=[])
release_1 = release('layers.1', fetched_2..fetched_3, readers=[addmm_1])
wait_2 = wait('layers.2', fetched_4..fetched_5, issued=[])
release_2 = release('layers.2', fetched_4..fetched_5, readers=[addmm_2])
reads of layers.0:
  t <- fetched (layers.0.weight)
  addmm <- fetched_1 (layers.0.bias)
reads of layers.1:
  t_1 <- fetched_2 (layers.1.weight)
  addmm_1 <- fetched_3 (layers.1.bias)
reads of layers.2:
  t_2 <- fetched_4 (layers.2.weight)
  addmm_2 <- fetched_5 (layers.2.bias)""",
        )

    def test_chain_with_a_head_refills_it_after_the_last_fetch(self):
        self.assertExpectedInline(
            chain(4, prefetch=2, prefetch_head=1, refill_in_graph=0),
            """\
head = head('layers.0', [layers.0.weight, layers.0.bias])
fetch_1 = fetch('layers.1', [layers.1.weight, layers.1.bias], after=[])
fetch_2 = fetch('layers.2', [layers.2.weight, layers.2.bias], after=[])
wait = wait('layers.0', fetched..fetched_1, issued=[fetched_2, fetched_4])
release = release('layers.0', fetched..fetched_1, readers=[addmm])
wait_1 = wait('layers.1', fetched_2..fetched_3, issued=[])
release_1 = release('layers.1', fetched_2..fetched_3, readers=[addmm_1])
fetch_3 = fetch('layers.3', [layers.3.weight, layers.3.bias], after=[release_1])
wait_2 = wait('layers.2', fetched_4..fetched_5, issued=[fetched_6])
release_2 = release('layers.2', fetched_4..fetched_5, readers=[addmm_2])
refill = refill('layers.0', fetched..fetched_1, after=[release_2, release])
wait_3 = wait('layers.3', fetched_6..fetched_7, issued=[slot_4])
release_3 = release('layers.3', fetched_6..fetched_7, readers=[addmm_3])
join = join('layers.0', fetched..fetched_1, issued=[relu_3])
reads of layers.0:
  t <- fetched (layers.0.weight)
  addmm <- fetched_1 (layers.0.bias)
reads of layers.1:
  t_1 <- fetched_2 (layers.1.weight)
  addmm_1 <- fetched_3 (layers.1.bias)
reads of layers.2:
  t_2 <- fetched_4 (layers.2.weight)
  addmm_2 <- fetched_5 (layers.2.bias)
reads of layers.3:
  t_3 <- fetched_6 (layers.3.weight)
  addmm_3 <- fetched_7 (layers.3.bias)""",
        )

    def test_a_barrier_keeps_fetches_below_it_and_drops_the_heads(self):
        """On a device, a trip through host memory between layers.0 and layers.1 splits the graph
        into two CUDA-graph partitions: no fetch moves above it, and no region is a head."""
        b = Builder("cuda")
        x = b.input(2, 8)
        params = [b.params(f"layers.{i}") for i in range(3)]
        x = b.block(x, *params[0], "layers.0")
        host = b.call(aten._to_copy.default, x, device=torch.device("cpu"))
        x = back = b.call(aten._to_copy.default, host, device=torch.device("cuda"))
        for i in (1, 2):
            x = b.block(x, *params[i], f"layers.{i}")
        text = b.finish(x, prefetch=2, prefetch_head=1, refill_in_graph=0)
        order = [node.name for node in b.gm.graph.nodes]
        assert order.index("fetch_1") > order.index(back.name), "layers.1's fetch moved above the barrier"
        self.assertExpectedInline(
            text,
            """\
fetch = fetch('layers.0', [layers.0.weight, layers.0.bias], after=[])
wait = wait('layers.0', fetched..fetched_1, issued=[])
release = release('layers.0', fetched..fetched_1, readers=[addmm])
fetch_1 = fetch('layers.1', [layers.1.weight, layers.1.bias], after=[])
fetch_2 = fetch('layers.2', [layers.2.weight, layers.2.bias], after=[])
wait_1 = wait('layers.1', fetched_2..fetched_3, issued=[fetched_4])
release_1 = release('layers.1', fetched_2..fetched_3, readers=[addmm_1])
wait_2 = wait('layers.2', fetched_4..fetched_5, issued=[])
release_2 = release('layers.2', fetched_4..fetched_5, readers=[addmm_2])
reads of layers.0:
  t <- fetched (layers.0.weight)
  addmm <- fetched_1 (layers.0.bias)
reads of layers.1:
  t_1 <- fetched_2 (layers.1.weight)
  addmm_1 <- fetched_3 (layers.1.bias)
reads of layers.2:
  t_2 <- fetched_4 (layers.2.weight)
  addmm_2 <- fetched_5 (layers.2.bias)""",
        )

    def test_a_module_called_twice_is_two_regions_of_the_same_parameters(self):
        b = Builder()
        x = b.input(2, 8)
        weight, bias = b.params("shared")
        x = b.block(x, weight, bias, "shared")
        x = b.block(x, weight, bias, "shared", call=1)
        self.assertExpectedInline(
            b.finish(x, prefetch=1, prefetch_head=0),
            """\
fetch = fetch('shared', [shared.weight, shared.bias], after=[])
fetch_1 = fetch('shared@1', [shared.weight, shared.bias], after=[])
wait = wait('shared', fetched..fetched_1, issued=[fetched_2])
release = release('shared', fetched..fetched_1, readers=[addmm])
wait_1 = wait('shared@1', fetched_2..fetched_3, issued=[])
release_1 = release('shared@1', fetched_2..fetched_3, readers=[addmm_1])
reads of shared:
  t <- fetched (shared.weight)
  addmm <- fetched_1 (shared.bias)
reads of shared@1:
  t_1 <- fetched_2 (shared.weight)
  addmm_1 <- fetched_3 (shared.bias)""",
        )


def _combine(*args):
    return args


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_release_is_ordered_after_every_reader(data):
    """Whatever the readers' graph, ``release`` takes every lazy reader's output (``must``: a
    consumer could inline it after the release), the last, and leaves out only outputs computed
    before one it takes, so a data edge orders every read before it. Checked on random DAGs
    against ancestor sets computed the slow way."""
    from fx_offload.rewrite import _held

    graph = fx.Graph()
    nodes = [graph.placeholder("x")]
    for i in range(data.draw(st.integers(1, 14))):
        inputs = data.draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=3, unique=True))
        nodes.append(graph.call_function(_combine, tuple(inputs), name=f"n{i}"))
    graph.output(tuple(nodes[-1:]))
    outputs = sorted(data.draw(st.lists(st.sampled_from(nodes[1:]), min_size=1, unique=True)))
    must = set(data.draw(st.lists(st.sampled_from(outputs), unique=True)))
    held = _held(outputs, must)

    def ancestors(node):
        found, todo = set(), [node]
        while todo:
            for arg in todo.pop().all_input_nodes:
                if arg not in found:
                    found.add(arg)
                    todo.append(arg)
        return found

    computed_before = set(held).union(*(ancestors(h) for h in held))
    assert held and held[-1] is outputs[-1] and held == sorted(held) and must <= set(held)
    assert set(outputs) <= computed_before, (outputs, held)
