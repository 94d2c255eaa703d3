"""``explain``: compile a model with the offload pass and return the rewritten graphs as text.

Two views of a rewritten graph: ``format_graph``, its whole code; ``format_offload_nodes``, only
what the pass added (the fx_offload nodes in graph order, with their arguments) and the reads it
rewired, so that moving one fetch changes one line.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from fx_offload import backend
from fx_offload.ops import FETCH, HEAD, HOLD, JOIN, REFILL, RELEASE, SWAPPED, WAIT, arguments
from fx_offload.regions import GraphPlan
from fx_offload.rewrite import SLOT, RewrittenRegion, escapes

_TRACE_COMMENT = re.compile(r"^\s*#.*$")


def explain(
    model: nn.Module,
    *args,
    backend_name: str = "offload_eager",
    options: Mapping[str, object] | None = None,
    compact: bool = False,
    **kwargs,
) -> str:
    """Run ``model(*args, **kwargs)`` compiled with the offload pass; return the graphs it made.

    ``backend_name="offload_eager"`` shows the AOTAutograd graph the pass rewrote;
    ``"offload_inductor"`` shows Inductor's post-grad graph (decomposed further). ``compact``
    shows only the pass's nodes and the reads they rewired (``format_offload_nodes``).
    """
    compiler = {"offload_eager": backend.offload_eager, "offload_inductor": backend.offload_inductor}
    if backend_name not in compiler:
        raise ValueError(f"backend_name must be one of {sorted(compiler)}, got {backend_name!r}")
    # a fresh callable, so Dynamo compiles again instead of reusing an earlier cache entry
    fresh = functools.partial(compiler[backend_name], options=dict(options or {}))
    # a cache hit would skip the pass: compile for real
    with recording(format_offload_nodes if compact else format_graph) as graphs, _no_compile_caches():
        torch.compile(model, backend=fresh)(*args, **kwargs)
    total = len(graphs)
    return "\n\n".join(f"# graph {i + 1} of {total}\n{text}" for i, text in enumerate(graphs))


@contextlib.contextmanager
def _no_compile_caches() -> Iterator[None]:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


Formatter = Callable[[fx.GraphModule, GraphPlan, Sequence[RewrittenRegion]], str]


@contextlib.contextmanager
def recording(formatter: Formatter | None = None) -> Iterator[list[str]]:
    """Collect ``formatter`` (``format_graph`` by default) of every graph the offload pass
    rewrites inside the block."""
    graphs: list[str] = []
    formatter = formatter or format_graph

    def listener(gm: fx.GraphModule, plan: GraphPlan, regions: list[RewrittenRegion]) -> None:
        graphs.append(formatter(gm, plan, regions))

    backend.listeners.append(listener)
    try:
        yield graphs
    finally:
        backend.listeners.remove(listener)


def format_graph(gm: fx.GraphModule, plan: GraphPlan, regions: list[RewrittenRegion]) -> str:
    """The graph's code, without stack-trace comments, headed by which input is which parameter."""
    placeholders = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    head = [f"# regions: {', '.join(r.region.name for r in regions)}"]
    head += [f"# {placeholders[i]}: {name}" for i, name in sorted(plan.offloaded_inputs.items())]
    head += [
        f"# {r.region.name}: head buffers passed as inputs ({', '.join(p.name for p in r.items)})"
        for r in regions
        if r.passed
    ]
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    body = [line for line in code.splitlines() if line.strip() and not _TRACE_COMMENT.match(line)]
    return "\n".join(head + body[1:])  # body[0] is "class GraphModule(torch.nn.Module):"


_OPS = {
    FETCH: "fetch",
    WAIT: "wait",
    RELEASE: "release",
    HEAD: "head",
    REFILL: "refill",
    JOIN: "join",
    SWAPPED: "swapped",
    HOLD: "hold",
}


def format_offload_nodes(gm: fx.GraphModule, plan: GraphPlan, regions: Sequence[RewrittenRegion]) -> str:
    """The fx_offload nodes of ``gm`` in graph order, then the reads the pass rewired.

    One line per node: ``name = op(region, buffers, <other arguments by their schema names>)``,
    offloaded parameters by name, a whole fetch's tensors as ``first..last``; a refill's
    ``weights`` (its head's parameters) are left out. Then, per region in the order they run,
    each node that reads its fetched tensors: ``addmm <- fetched_1 (layers.0.fc1.bias)``; and any
    read of an offloaded parameter the pass left on the host.
    """
    graph = gm.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    names = {placeholders[i]: name for i, name in plan.offloaded_inputs.items()}
    names.update({placeholders[i]: name for i, (name, _component) in plan.swapped_inputs.items()})
    items: dict[fx.Node, list[fx.Node]] = {}  # a fetch, head or swapped node -> its tensors
    carries: dict[fx.Node, str] = {}  # one of those tensors -> the parameter it carries
    for node in graph.nodes:
        if node.target is operator.getitem and getattr(node.args[0], "target", None) in (
            FETCH,
            HEAD,
            SWAPPED,
        ):
            source = node.args[0]
            items.setdefault(source, []).append(node)
            param = source.args[0][node.args[1]]
            carries[node] = names.get(param, param.name)
    whole = {
        tuple(tensors): f"{tensors[0].name}..{tensors[-1].name}"
        for tensors in items.values()
        if len(tensors) > 1
    }

    def show(value) -> str:
        if isinstance(value, (list, tuple)):
            return whole.get(tuple(value)) or "[" + ", ".join(show(v) for v in value) + "]"
        if isinstance(value, fx.Node):
            return names.get(value, value.name)
        return repr(value)

    lines = []
    for node in graph.nodes:
        if node.target in _OPS:
            passed = arguments(node)
            first = passed.pop(next(iter(passed)))  # the tensors the op is about
            label = passed.pop("region", None) or passed.pop("component", None)
            if node.target is REFILL:
                del passed["weights"]  # its head's parameters
            passed.pop("slot", None)  # an empty tensor the op writes (rewrite._slot)
            written = [n for n in passed.pop("written", []) if n.target is not SLOT]
            if written:  # release's buffers read lazily, beside its slot
                passed["written"] = written
            shown = [
                repr(label),
                show(first),
                *(f"{name}={show(value)}" for name, value in passed.items()),
            ]
            lines.append(f"{node.name} = {_OPS[node.target]}({', '.join(shown)})")

    skip = set(_OPS)
    as_inputs = set()
    for r in regions:
        if r.passed:
            lines.append(f"reads of {r.region.name} (its head buffers passed as inputs):")
            lines += _reads(graph, r.items, {param: names[param] for param in r.items}, skip)
            as_inputs.update(r.items)
            continue
        lines.append(f"reads of {r.region.name}:")
        lines += _reads(graph, r.items, carries, skip)
    for node in graph.nodes:
        if node.target is SWAPPED:
            lines.append(f"reads of swapped component {node.args[1]}:")
            lines += _reads(graph, items.get(node, []), carries, skip)
    for component, positions in plan.components_passed().items():
        params = [placeholders[i] for i in positions]
        lines.append(f"reads of swapped component {component} (its device copies passed as inputs):")
        lines += _reads(graph, params, {param: names[param] for param in params}, skip)
        as_inputs.update(params)
    left = [
        f"  {user.name} <- {param.name} ({names[param]})" + (" (leaves the graph)" if escapes(user) else "")
        for param in names
        if param not in as_inputs
        for user in param.users
        if user.target not in skip
    ]
    if left:
        lines += ["reads left on the host:", *left]
    return "\n".join(lines)


def _reads(graph: fx.Graph, tensors: Sequence[fx.Node], carries: Mapping[fx.Node, str], skip) -> list[str]:
    readers: dict[fx.Node, list[fx.Node]] = {}
    for tensor in tensors:
        for user in tensor.users:
            if user.target not in skip:
                readers.setdefault(user, []).append(tensor)
    order = {node: i for i, node in enumerate(graph.nodes)}
    return [
        f"  {user.name} <- " + ", ".join(f"{t.name} ({carries[t]})" for t in read)
        for user, read in sorted(readers.items(), key=lambda pair: order[pair[0]])
    ]
