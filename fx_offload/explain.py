"""``explain``: compile a model with the offload pass and return the rewritten graphs as text."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Mapping

import torch
import torch.fx as fx
from torch import nn

from fx_offload import backend
from fx_offload.regions import GraphPlan
from fx_offload.rewrite import RewrittenRegion

_TRACE_COMMENT = re.compile(r"^\s*#.*$")


def explain(
    model: nn.Module,
    *args,
    backend_name: str = "offload_eager",
    options: Mapping[str, object] | None = None,
    **kwargs,
) -> str:
    """Run ``model(*args, **kwargs)`` compiled with the offload pass; return the graphs it made.

    ``backend_name="offload_eager"`` shows the AOTAutograd graph the pass rewrote;
    ``"offload_inductor"`` shows Inductor's post-grad graph (decomposed further).
    """
    compiler = {"offload_eager": backend.offload_eager, "offload_inductor": backend.offload_inductor}
    if backend_name not in compiler:
        raise ValueError(f"backend_name must be one of {sorted(compiler)}, got {backend_name!r}")
    # a fresh callable, so Dynamo compiles again instead of reusing an earlier cache entry
    fresh = functools.partial(compiler[backend_name], options=dict(options or {}))
    # a cache hit would skip the pass: compile for real
    with recording() as graphs, _no_compile_caches():
        torch.compile(model, backend=fresh)(*args, **kwargs)
    total = len(graphs)
    return "\n\n".join(f"# graph {i + 1} of {total}\n{text}" for i, text in enumerate(graphs))


@contextlib.contextmanager
def _no_compile_caches() -> Iterator[None]:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


@contextlib.contextmanager
def recording() -> Iterator[list[str]]:
    """Collect ``format_graph`` of every graph the offload pass rewrites inside the block."""
    graphs: list[str] = []

    def listener(gm: fx.GraphModule, plan: GraphPlan, regions: list[RewrittenRegion]) -> None:
        graphs.append(format_graph(gm, plan, regions))

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
    code = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    body = [line for line in code.splitlines() if line.strip() and not _TRACE_COMMENT.match(line)]
    return "\n".join(head + body[1:])  # body[0] is "class GraphModule(torch.nn.Module):"
