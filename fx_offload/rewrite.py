"""The offload pass: fetch, wait and release nodes around every region (pure graph surgery).

``rewrite(graph, plan)`` is the whole pass. It runs in two steps:

1. insert: for each region, ``fetch`` and ``wait`` before its first read and ``release`` after
   its last reader, taking every reader's output as input (views of a fetched tensor count as
   reads through their users); the region's reads are rewired to the fetched tensors.
2. schedule: with ``prefetch_head`` = H, H regions are heads (persistent buffers, see
   ``_serve_head``): the plan's ``head_regions`` (the first H of Dynamo's graph, wherever this
   graph runs them), else this graph's first H. They hold their memory for the whole call; every
   other region's ``fetch`` moves up to just after the release of the region ``prefetch + 1 - H``
   fetched regions earlier (so at most ``prefetch + 1`` regions, heads included, hold device
   memory), tied there with that
   release's token, and the first ``wait`` after it lists it as issued (so no scheduler sinks it
   back to its use). A fetch never moves above a barrier: a node that touches memory of another
   device, or that CUDA graphs cannot capture, would split the copy from its wait across two
   captured segments. Each head gets a ``refill`` for the next call, issued after the last
   fetch; its ``in_graph`` argument (``plan.refill_in_graph``, spent on the heads in order; by
   default what ``estimate.tail_bytes`` says the compute after the last fetch can hide) is how
   many of its bytes the graph copies there itself, the wrapper copying the rest after the call.
   Where the plan passes the heads as inputs (``heads_as_inputs``: no CUDA graphs), the heads get
   no node at all: their weights leave the regions, every read of them reads the buffers the
   wrapper puts in their place, and the other regions are scheduled as above.

Before (one offloaded ``Linear`` called ``visual``)::

    t = aten.t(arg0_1); addmm = aten.addmm(arg1_1, x, t)

After::

    fetch = fx_offload.fetch([arg0_1, arg1_1], [], 'visual')
    getitem = fetch[0]; getitem_1 = fetch[1]
    wait = fx_offload.wait([getitem, getitem_1], [], 'visual')
    t = aten.t(getitem); addmm = aten.addmm(getitem_1, x, t)
    release = fx_offload.release([getitem, getitem_1], [addmm], 'visual')
"""

from __future__ import annotations

import bisect
import dataclasses
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from fx_offload import estimate
from fx_offload.ops import FETCH, HEAD, HOLD, JOIN, REFILL, RELEASE, SWAPPED, WAIT
from fx_offload.options import AUTO
from fx_offload.regions import GraphPlan, Region, find_regions, is_write_back


@dataclass(eq=False)
class RewrittenRegion:
    """The nodes the pass added for one region. A head whose buffers the wrapper passes as the
    graph's inputs (``GraphPlan.heads_as_inputs``) has none: its ``items`` are the weights' own
    placeholders, which the wrapper fills with the buffers."""

    region: Region
    fetch: fx.Node | None
    items: list[fx.Node]
    wait: fx.Node | None
    release: fx.Node | None

    @property
    def passed(self) -> bool:
        """Whether the wrapper passes this head region's buffers as the graph's inputs."""
        return self.fetch is None


def rewrite(graph: fx.Graph, plan: GraphPlan) -> list[RewrittenRegion]:
    """Insert fetch / wait / release for every region of ``graph`` and schedule the fetches.

    Returns the added nodes per region, in the order the regions run (heads passed as inputs
    first: they have none).
    """
    if plan.prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {plan.prefetch}")
    if plan.prefetch_head > plan.prefetch:
        raise ValueError(
            f"prefetch_head={plan.prefetch_head} needs prefetch >= {plan.prefetch_head} (the heads count "
            f"among the prefetch + 1 regions on the device), got prefetch={plan.prefetch}"
        )
    _refuse_captured_write_backs(graph, plan)
    if plan.heads_as_inputs:  # the wrapper passes the heads' buffers: their reads stay as they are
        passed = _passed_heads(graph, plan)
        held = {i for _, positions in plan.head_regions for i in positions}
        rest = dataclasses.replace(
            plan, offloaded_inputs={i: n for i, n in plan.offloaded_inputs.items() if i not in held}
        )
        inserted = [_insert(graph, region) for region in find_regions(graph, rest)]
        inserted.sort(key=lambda r: r.wait)  # nodes compare by their place in the graph
        _schedule(graph, inserted, plan.prefetch - len(passed), 0, plan.device_type)
        inserted = passed + inserted
    else:
        regions = find_regions(graph, plan)  # in the order their reads start
        inserted = [_insert(graph, region) for region in regions]
        inserted.sort(key=lambda r: r.wait)
        heads = [] if has_barrier(graph, plan.device_type) else _heads(graph, regions, plan)
        rewritten = {id(r.region): r for r in inserted}
        served = [rewritten[id(head.region)] for head in heads]
        order = served + [r for r in inserted if r not in served]  # the heads first, then in graph order
        _schedule(graph, order, plan.prefetch, len(heads), plan.device_type)
        if heads:
            _serve_head(graph, order, plan, heads)
    _serve_swapped(graph, plan)
    graph.lint()
    return inserted


def _insert(graph: fx.Graph, region: Region) -> RewrittenRegion:
    users = []
    for user in region.users:  # a view that leaves the graph keeps reading the parameter
        twin = _keep_in_graph(graph, user) if escapes(user) else user
        if twin is not None:
            users.append(twin)
    with graph.inserting_before(region.users[0]):
        fetch = _call(graph, FETCH, (list(region.params), [], region.name), "fetch")
        items = [_call(graph, operator.getitem, (fetch, i), "fetched") for i in range(len(region.params))]
        wait = _call(graph, WAIT, (items, [], region.name), "wait")
    for user in users:
        for param, item in zip(region.params, items):
            user.replace_input_with(param, item)
    readers = _readers(items)
    outputs = [out for reader in readers if not _is_alias(reader) for out in _tensor_outputs(reader)]
    outputs.sort()  # nodes compare by their place in the graph
    last = max(readers + outputs, default=wait)
    lazy = {r for r in readers if not _is_alias(r) and not _realized(r)}
    read_lazily = [item for item in items if lazy.intersection(_readers([item]))]
    must = {out for reader in lazy for out in _tensor_outputs(reader)}
    with graph.inserting_after(last):
        slot = _slot(graph, items)
    with graph.inserting_after(slot):
        args = (items, _held(outputs, must), [*read_lazily, slot], region.name)
        release = _call(graph, RELEASE, args, "release")
    return RewrittenRegion(region, fetch, items, wait, release)


@dataclass(eq=False)
class _HeadRegion:
    """A region served from head buffers: ``name`` and ``weights`` as the wrapper's buffers hold
    them (the head's every weight, in the order of the graph's inputs)."""

    region: Region
    name: str
    weights: list[fx.Node]


def _heads(graph: fx.Graph, regions: list[Region], plan: GraphPlan) -> list[_HeadRegion]:
    """The regions (in the order they run) served from head buffers, in that order: those the
    plan names (the backend chose them in Dynamo's graph and made their buffers: each is the first
    region, in this graph, that reads only weights among the head's; Inductor may have reordered
    the regions, or dropped a read), else this graph's first ``prefetch_head``."""
    if not plan.head_regions:
        return [_HeadRegion(r, r.name, list(r.params)) for r in regions[: plan.prefetch_head]]
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    index = {node: i for i, node in enumerate(placeholders)}
    heads: list[_HeadRegion] = []
    for name, positions in plan.head_regions:
        taken = {id(head.region) for head in heads}
        within = set(positions)
        for r in regions:
            if id(r) not in taken and {index[p] for p in r.params} <= within:
                heads.append(_HeadRegion(r, name, [placeholders[i] for i in positions]))
                break
    place = {id(r): k for k, r in enumerate(regions)}
    heads.sort(key=lambda head: place[id(head.region)])
    return heads


def _passed_heads(graph: fx.Graph, plan: GraphPlan) -> list[RewrittenRegion]:
    """The plan's heads, whose buffers the wrapper passes as the graph's inputs at their weights'
    positions: the pass adds nothing for them, and every read of those weights, by any region,
    reads the buffers. They must only be read (``_check_only_read``)."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    passed = []
    fix = "compile with options={'heads_as_inputs': False}"
    for name, positions in plan.head_regions:
        weights = [placeholders[i] for i in positions]
        for i in positions:
            _check_only_read(placeholders[i], plan.offloaded_inputs[i], "its head's buffer", fix)
        passed.append(RewrittenRegion(Region(name, name, weights), None, weights, None, None))
    return passed


def _schedule(
    graph: fx.Graph, order: list[RewrittenRegion], depth: int, heads: int, device_type: str
) -> None:
    """Place each fetch: the ``heads`` first regions of ``order`` (the heads, wherever the graph
    runs them; ``_serve_head`` turns their fetches into ``head``) at the graph's start, the others
    (in graph order) at most ``depth`` regions ahead of their wait."""
    # Nodes compare by their place in the graph (FX keeps that order as nodes move), so no step
    # here rescans the graph: waits and barriers never move, only fetches and their items do.
    waits = sorted(r.wait for r in order)
    barriers = _barriers(graph, device_type)
    start = next(node for node in reversed(graph.nodes) if node.op == "placeholder")
    slots = depth + 1 - heads  # the regions copied during the call that may hold memory at once
    for k, current in enumerate(order):
        anchor, token = start, None
        if k - slots >= heads:  # a head's memory is never freed for another region
            previous = order[k - slots].release
            if previous > current.wait:
                continue  # regions interleave here: the fetch stays beside its wait
            anchor, token = previous, previous
        anchor = _last_barrier(barriers, anchor, current.wait) or anchor
        if k and anchor < order[k - 1].items[-1] < current.wait:
            anchor = order[k - 1].items[-1]  # the copy stream is FIFO: issue in region order
        if token is not None:
            current.fetch.update_arg(1, [token])
        anchor.append(current.fetch)
        for item in reversed(current.items):
            current.fetch.append(item)
        pin = _first_after(waits, current.fetch, end=bisect.bisect_left(waits, current.wait))
        if pin is not None:
            pin.update_arg(1, [*pin.args[1], current.items[0]])


def _serve_head(
    graph: fx.Graph, order: list[RewrittenRegion], plan: GraphPlan, served: list[_HeadRegion]
) -> None:
    """Serve the ``served`` regions (the first of ``order``) from persistent buffers, refilled
    late in the call (or, under fx_offload's wrapper, after it but for their first
    ``plan.refill_in_graph`` bytes) for the next one."""
    depth, device_type, in_graph = plan.prefetch, plan.device_type, plan.refill_in_graph
    count = len(served)
    heads, fetched = order[:count], order[count:]
    for declared, first in zip(served, heads):
        with graph.inserting_before(first.fetch):
            head = _call(graph, HEAD, (declared.weights, declared.name), "head")
        first.fetch.replace_all_uses_with(head)
        graph.erase_node(first.fetch)
        first.fetch = head
        # one item per weight of the head, the region's own reads keeping theirs
        items = dict(zip(first.region.params, first.items))
        for j, weight in enumerate(declared.weights):
            if weight in items:
                items[weight].update_arg(1, j)
            else:
                with graph.inserting_after(head):
                    items[weight] = _call(graph, operator.getitem, (head, j), "fetched")
        first.items = [items[weight] for weight in declared.weights]
        first.wait.update_arg(0, first.items)
        first.release.update_arg(0, first.items)

    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    waits = sorted(r.wait for r in order)
    barriers = _barriers(graph, device_type)
    slots = depth + 1 - count
    sizes = [sum(_nbytes(weight) for weight in declared.weights) for declared in served]
    if in_graph == AUTO:  # the refills start after the last fetch and after their heads' reads
        start = max([first.release for first in heads] + [r.wait for r in fetched[-1:]])
        in_graph = _auto_in_graph(graph, start, sum(sizes), plan.device_figures)
    previous = fetched[-1].items[-1] if fetched else None
    written = []  # each refill's slot, which its join writes after it
    for j, (declared, first) in enumerate(zip(served, heads)):
        # the refill of head j is one more region after the last: issued like the fetch of region
        # len(order) + j would be, after the release of its own region, and after the last
        # fetch and the refill before it (the copy stream is FIFO)
        token = order[min(max(len(order) + j - slots, 0), len(order) - 1)].release
        if token < first.release:
            token = first.release
        after = previous if previous is not None and previous > token else token
        anchor = _last_barrier(barriers, after, output) or after
        # a parameter the graph writes in place is refilled after that write, with its new value
        writes = [n for param in declared.weights for n in param.users if is_write_back(n, param)]
        anchor = max([anchor, *writes])
        copied = min(sizes[j], in_graph)
        in_graph -= copied
        with graph.inserting_after(anchor):
            slot = _slot(graph, first.items)
        # the token orders the copy stream; the head's own release orders every read of its buffers
        tokens = [token] if token is first.release else [token, first.release]
        args = (first.items, declared.weights, tokens, slot, declared.name)
        with graph.inserting_after(slot):
            refill = _call(graph, REFILL, (*args, copied) if copied else args, "refill")
        written.append(slot)
        previous = refill
        pin = _first_after(waits, refill)
        if pin is not None:  # reading the slot the refill wrote orders this wait after the refill
            pin.update_arg(1, [*pin.args[1], slot])
    results = [n for n in output.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    for declared, first, slot in zip(served, heads, written):
        with graph.inserting_before(output):
            _call(graph, JOIN, (first.items, results, slot, declared.name), "join")


def _auto_in_graph(
    graph: fx.Graph, start: fx.Node, whole: int, figures: estimate.DeviceFigures | None
) -> int:
    """``refill_in_graph`` 'auto': the bytes the copy engine moves during the graph's tail (its
    compute after ``start``, the last fetched region's wait), at most the heads' ``whole`` bytes;
    all of them where the device gave no ``figures`` to estimate the tail with (a CPU)."""
    if figures is None:
        return whole
    nodes = list(graph.nodes)
    return min(whole, estimate.tail_bytes(nodes[nodes.index(start) + 1 :], figures))


def _serve_swapped(graph: fx.Graph, plan: GraphPlan) -> None:
    """Read swapped parameters from their component's fixed device copy, held to the end."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    by_component: dict[str, list[fx.Node]] = {}
    for i, (name, component) in sorted(plan.swapped_inputs.items()):
        if i in plan.swapped_as_inputs:  # the wrapper passes the device copy itself
            fix = "restore the model and offload it with policy='stream'"
            _check_only_read(placeholders[i], name, "its component's device copy", fix)
        elif placeholders[i].users:
            by_component.setdefault(component, []).append(placeholders[i])
    if not by_component:
        return
    first = next(node for node in graph.nodes if node.op != "placeholder")
    output = next(node for node in graph.nodes if node.op == "output")
    results = [n for n in output.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    for component, params in by_component.items():
        with graph.inserting_before(first):
            node = _call(graph, SWAPPED, (params, component), "swapped")
            items = [_call(graph, operator.getitem, (node, i), "on_device") for i in range(len(params))]
        for param, item in zip(params, items):
            for user in list(param.users):
                # a weight the graph returns (a training forward saves it for the backward) stays
                # the parameter: its device copy is the component's range, which another
                # component's swap-in may overwrite before the backward reads it
                if user is node or is_write_back(user, param) or user.op == "output":
                    continue
                reader = _keep_in_graph(graph, user) if escapes(user) else user
                if reader is not None:
                    reader.replace_input_with(param, item)
        with graph.inserting_before(output):
            _call(graph, HOLD, (items, results, component), "hold")


def _check_only_read(param: fx.Node, name: str, copy: str, fix: str) -> None:
    """A parameter whose device ``copy`` the wrapper passes in its place must only be read here: a
    write-back would store into the copy instead of the parameter, an escaping view would hand
    the copy to the caller. ``backend.graph_plan`` decided so from Dynamo's graph; ``fix`` says how
    to do without the passing."""
    for user in param.users:
        if escapes(user) or is_write_back(user, param) or user.op == "output":
            raise RuntimeError(
                f"fx_offload: parameter {name!r} was planned to be passed as {copy}, only read, but the "
                f"graph the offload pass rewrites writes or returns it ({user.format_node()}). Please "
                f"report this; {fix} meanwhile"
            )


def _refuse_captured_write_backs(graph: fx.Graph, plan: GraphPlan) -> None:
    """An in-place write of an offloaded parameter inside the graph stores into its host memory.
    On a GPU that is a kernel writing a device-typed view of pinned memory: correct, over the
    bus, but not inside a captured CUDA graph (such kernels fault there), so refuse it."""
    if plan.device_type == "cpu" or not torch._inductor.config.triton.cudagraphs:
        return
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    names = {**plan.offloaded_inputs, **{i: name for i, (name, _) in plan.swapped_inputs.items()}}
    for i, name in sorted(names.items()):
        if any(is_write_back(user, placeholders[i]) for user in placeholders[i].users):
            raise RuntimeError(
                f"the compiled forward writes offloaded parameter {name!r} in place, and CUDA graphs "
                "cannot capture a write into host memory: compile without CUDA graphs (not "
                "mode='reduce-overhead'), keep its module resident, or make the write between calls "
                "(the next call sees it)"
            )


def _barriers(graph: fx.Graph, device_type: str) -> list[fx.Node]:
    """The graph's barriers, in graph order (the pass never moves them)."""
    return [node for node in graph.nodes if _is_barrier(node, device_type)]


def _last_barrier(barriers: list[fx.Node], after: fx.Node, before: fx.Node) -> fx.Node | None:
    """The last of ``barriers`` (in graph order) strictly between ``after`` and ``before``."""
    i = bisect.bisect_left(barriers, before)
    return barriers[i - 1] if i and barriers[i - 1] > after else None


def _first_after(nodes: list[fx.Node], node: fx.Node, end: int | None = None) -> fx.Node | None:
    """The first of ``nodes[:end]`` (in graph order) after ``node``."""
    end = len(nodes) if end is None else end
    i = bisect.bisect_right(nodes, node, 0, end)
    return nodes[i] if i < end else None


def has_barrier(graph: fx.Graph, device_type: str) -> bool:
    """Whether ``graph`` holds a node that splits it into CUDA-graph partitions.

    The first region's persistent buffers cannot cross such a split: Inductor hands a
    partition's outputs to the next through its CUDA graph pool, and they live outside it.
    """
    return any(_is_barrier(node, device_type) for node in graph.nodes)


def _is_barrier(node: fx.Node, device_type: str) -> bool:
    if node.op not in ("call_function", "call_method") or device_type == "cpu":
        return False
    unsafe = getattr(torch.Tag, "cudagraph_unsafe", None)
    if unsafe is not None and isinstance(node.target, torch._ops.OpOverload):
        if unsafe in node.target.tags:
            return True
    values = [_value(node)] + [_value(arg) for arg in node.all_input_nodes]
    return any(isinstance(v, torch.Tensor) and v.device.type != device_type and v.dim() > 0 for v in values)


def _value(node: fx.Node):
    # post-grad and AOT graphs carry "val"; Dynamo's graph carries "example_value"
    return node.meta.get("val", node.meta.get("example_value"))


def _nbytes(node: fx.Node) -> int:
    value = _value(node)
    return value.nbytes if isinstance(value, torch.Tensor) else 0


def _readers(items: list[fx.Node]) -> list[fx.Node]:
    """Every node that reads the fetched tensors, following views to their users."""
    found, seen, todo = [], set(), list(items)
    while todo:
        for user in todo.pop().users:
            if user.target in (WAIT, RELEASE, REFILL, JOIN) or user in seen:
                continue
            found.append(user)
            seen.add(user)
            if _is_alias(user):
                todo.append(user)
    return found


SLOT = torch.ops.aten.empty.memory_format  # the op that makes a slot


def _slot(graph: fx.Graph, items: list[fx.Node]) -> fx.Node:
    """An empty tensor for one op to write (``release``, ``refill``, ``join``): what keeps that op
    in the graph and in order, where declaring a write of the buffers would make Inductor count it
    as one more reader of every reader's output (and keep each from being overwritten in place)."""
    device = _value(items[0]).device if items else torch.device("cpu")
    return _call(graph, SLOT, ([0],), "slot", dtype=torch.uint8, device=device)


# readers whose read of a weight happens in an extern kernel of their own that Inductor never
# inlines into a consumer: once one is computed, so is its read. Not bmm (on the CPU, and on a GPU
# for dot shapes, Inductor lowers some to a lazy mul + sum), not convolution (a GPU lowering adds
# the bias in a separate lazy op); none where Inductor lowers matmuls as its own IR
# (``triton.native_matmul``)
_EXTERN_READERS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default})


def _realized(reader: fx.Node) -> bool:
    if getattr(torch._inductor.config.triton, "native_matmul", False):
        return False
    return reader.target in _EXTERN_READERS


def _held(outputs: list[fx.Node], must: set[fx.Node]) -> list[fx.Node]:
    """Of the readers' outputs (in graph order), those ``release`` takes: each of ``must`` (the
    lazy readers', which Inductor computes only when something needs them), the last, and any
    other not computed before one of those. An output left out is an extern kernel's (its read
    happens in that kernel) computed before one taken, so a data edge orders its read before the
    release. Taking fewer keeps ``release`` from reading the readers' outputs: one it reads,
    Inductor cannot overwrite in place (a ReLU, the SwiGLU product), and kernels would differ
    from the resident model's (each variant one more kernel to compile). Linear in the region:
    each node between the first output and the last is walked at most once."""
    if not outputs:
        return []
    first, held, before = outputs[0], [], set()  # before: computed before one of ``held``
    for out in reversed(outputs):
        if out in before and out not in must:
            continue
        held.append(out)
        before.add(out)
        todo = [out]
        while todo:
            for arg in todo.pop().all_input_nodes:
                if arg >= first and arg not in before:
                    before.add(arg)
                    todo.append(arg)
    return held[::-1]


def _tensor_outputs(node: fx.Node) -> list[fx.Node]:
    """``node`` if it is a tensor, else the tensors taken out of it (a tuple's getitems)."""
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return [node]
    if isinstance(value, (tuple, list)):
        return [user for user in node.users if user.target is operator.getitem]
    return [node] if value is None and node.op == "call_function" else []


def _keep_in_graph(
    graph: fx.Graph, escaping: fx.Node, source: fx.Node | None = None, twin_source: fx.Node | None = None
) -> fx.Node | None:
    """``escaping``, a view of a parameter (through ``source``, a view of it) that leaves the
    graph (a training forward saves ``t(weight)`` for the backward): give its users inside the graph
    a twin of it reading ``twin_source`` instead of ``source``, so that only the value that leaves
    reads the parameter (as it is after the call) and the graph's own reads can be rewired to the
    fetched copy. Returns the twin, or None when every user is the graph's output."""
    inner = [user for user in escaping.users if user.op != "output"]
    if not inner:
        return None
    with graph.inserting_after(escaping):
        twin = graph.node_copy(escaping, lambda node: twin_source if node is source else node)
    for user in inner:
        if _is_alias(user) and escapes(user):
            _keep_in_graph(graph, user, escaping, twin)
        else:
            user.replace_input_with(escaping, twin)
    return twin


def escapes(user: fx.Node) -> bool:
    """Whether a view of the parameter made by ``user`` leaves the graph (then it keeps reading the
    parameter, and ``_keep_in_graph`` gives the graph's own reads a twin of it)."""
    todo = [user] if _is_alias(user) else []
    while todo:
        node = todo.pop()
        for next_user in node.users:
            if next_user.op == "output":
                return True
            if _is_alias(next_user):
                todo.append(next_user)
    return False


def _is_alias(node: fx.Node) -> bool:
    target = node.target
    if target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _is_alias(node.args[0])
    if isinstance(target, torch._ops.OpOverload):
        return any(
            ret.alias_info is not None and not ret.alias_info.is_write for ret in target._schema.returns
        )
    return False


def _call(graph: fx.Graph, target, args: tuple, name: str, **kwargs) -> fx.Node:
    node = graph.create_node("call_function", target, args, kwargs, name=name)
    values = torch.fx.node.map_arg(args, lambda n: n.meta.get("val"))
    leaves = torch.utils._pytree.tree_leaves(values)
    # the fake mode of the arguments' values (the graph's: all its values share one), found
    # among the arguments rather than the placeholders so that each inserted node costs its own size
    fake_mode = detect_fake_mode(leaves)
    if fake_mode is not None and not any(v is None for v in leaves):
        with fake_mode:
            node.meta["val"] = target(*values, **kwargs)
    return node
