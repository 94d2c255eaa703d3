"""What the offload pass did to each graph: ``TORCH_LOGS`` output and counters, like Inductor's passes.

``TORCH_LOGS="fx_offload"`` logs, per graph, the window chosen and each region with its bytes
and how it is served; ``TORCH_LOGS="+fx_offload"`` adds the graph before and after the pass
(formatted only when enabled). ``torch._logging.set_logs(modules={"fx_offload": logging.DEBUG})``
is the in-process form.

Counters add up in ``torch._dynamo.utils.counters["fx_offload"]``, beside Dynamo's and Inductor's
(``counters["inductor"]``), so that the tools and tests that read or clear those see ours too:

* ``graphs``: graphs rewritten; ``regions``: regions in them; ``heads``: regions served from
  head buffers;
* ``fetched_bytes``: bytes the rewritten graphs fetch inside one call each (their regions that
  are no heads); ``head_bytes``: bytes of their heads;
* ``refills``: head refills inserted; ``refill_in_graph_bytes``: the part of them each call
  copies itself;
* ``swapped``: swapped components the graphs read.

They count what the pass built, at compile time; ``runtime.copied_bytes`` counts the bytes
actually copied host to device at run time. The runtime adds, per call of a graph with heads,
where the copy of its heads was issued (``fx_offload.sequence.Origin``):

* ``head_copy_same_graph``: after the graph's own previous call, by its refill (a graph Dynamo
  reuses for every block of a stack refills its heads with the next block's weights);
* ``head_copy_previous_graph``: after the previous call, of another graph, by its prefetch into
  these heads (``cross_graph_prefetches``);
* ``head_copy_between_forwards``: after the previous forward's last call;
* ``head_copy_not_predicted``: when the call began (the first calls, a wrong guess, a weight
  written since);

and ``cross_graph_prefetches``: copies into another graph's heads issued after a call, for the
call the device's call sequence expects next. ``fx_offload.runtime.last_forward()`` prints the
last forward's calls with their origins.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch.fx as fx
from torch._dynamo.utils import counters
from torch._logging import LazyString
from torch._logging._internal import register_log

from fx_offload import placement
from fx_offload.ops import FETCH, HEAD, REFILL, SWAPPED, arguments
from fx_offload.regions import GraphPlan, common_module

register_log("fx_offload", "fx_offload")
log = logging.getLogger(__name__)


def planned(sizes: Sequence[int], prefetch: int, heads: int, options, why: str = "") -> None:
    """Log the window ``graph_plan`` chose for a graph whose regions hold ``sizes`` bytes (``why``:
    a rule that chose it other than the options')."""
    log.info(
        "window: prefetch=%s, heads=%s for %d regions of %s (asked: prefetch=%s, prefetch_head=%s)%s",
        prefetch,
        heads,
        len(sizes),
        LazyString(lambda: ", ".join(_bytes(size) for size in sizes) or "no bytes"),
        options.prefetch,
        options.prefetch_head,
        f"; {why}" if why else "",
    )


def graph_before(gm: fx.GraphModule) -> str | None:
    """The code of ``gm`` before the pass where ``+fx_offload`` asks for it, else ``None``."""
    if not log.isEnabledFor(logging.DEBUG):
        return None
    return _code(gm)


def rewritten(gm: fx.GraphModule, plan: GraphPlan, regions: Sequence, before: str | None = None) -> None:
    """Count and log what the pass did to ``gm`` under ``plan``: ``regions`` are ``rewrite``'s
    result, ``before`` is ``graph_before(gm)`` taken before the pass."""
    graph = gm.graph
    refills = [arguments(node) for node in graph.nodes if node.target is REFILL]
    refills = {refill["region"]: refill.get("in_graph", 0) for refill in refills}
    swapped = [node for node in graph.nodes if node.target is SWAPPED]
    sizes = [sum(_nbytes(param) for param in r.region.params) for r in regions]
    heads = [r.passed or r.fetch.target is HEAD for r in regions]
    count = counters["fx_offload"]
    count["graphs"] += 1
    count["regions"] += len(regions)
    count["heads"] += sum(heads)
    count["head_bytes"] += sum(size for size, head in zip(sizes, heads) if head)
    count["fetched_bytes"] += sum(size for size, head in zip(sizes, heads) if not head)
    count["refills"] += len(refills)
    count["refill_in_graph_bytes"] += sum(refills.values())
    passed = plan.components_passed()
    count["swapped"] += len(swapped) + len(passed)
    log.info("%s", LazyString(_summary, plan, regions, sizes, refills, swapped, passed, graph))
    if before is not None:
        log.debug("graph before the offload pass:\n%s", before)
    log.debug("graph after the offload pass:\n%s", LazyString(_code, gm))


def _summary(
    plan: GraphPlan,
    regions: Sequence,
    sizes: list[int],
    refills: dict[str, int],
    swapped: list[fx.Node],
    passed: dict[str, list[int]],
    graph: fx.Graph,
) -> str:
    heads = sum(r.passed or r.fetch.target is HEAD for r in regions)
    components = len(swapped) + len(passed)
    lines = [
        f"rewrote a graph: {len(regions)} regions, {_bytes(sum(sizes))} offloaded; "
        f"prefetch={plan.prefetch}, heads={heads}"
        + (" passed as inputs" if plan.heads_as_inputs else f", refill_in_graph={plan.refill_in_graph}")
        + (f"; {components} swapped components" if components else "")
    ]
    names = _full_names(graph, plan, regions)
    release_of = {r.release: name for r, name in zip(regions, names)}
    width = max(map(len, names), default=0)
    for r, size, name in zip(regions, sizes, names):
        if r.passed:
            how = "head: copied in between calls, passed as the graph's inputs"
        elif r.fetch.target is HEAD:
            how = "head: copied in between calls"
            if r.region.name in refills:
                how += f", {_bytes(refills[r.region.name])} of its refill inside the call"
        elif r.fetch.target is FETCH:
            after = [release_of.get(token, token.name) for token in r.fetch.args[1]]
            how = "fetched after the release of " + ", ".join(after) if after else "fetched at the start"
        else:
            how = f"served by {r.fetch.target}"
        lines.append(f"  {name:<{width}}  {_bytes(size):>10}  {how}")
    for node in swapped:
        lines.append(f"  swapped component {node.args[1]}: {len(node.args[0])} parameters")
    for component, positions in passed.items():
        lines.append(f"  swapped component {component}: {len(positions)} parameters, passed as inputs")
    return "\n".join(lines)


def _full_names(graph: fx.Graph, plan: GraphPlan, regions: Sequence) -> list[str]:
    """Each region's module as the model names it (``visual.blocks.0.attn.proj``), from the names
    of the parameters it reads: the graph's own names are relative to the frame Dynamo compiled
    (``proj`` for a block's forward after a graph break, two modules alike). A tied weight is
    named as the module of the region that reads it (``lm_head``, not ``embed``). A graph reused
    for every block of a stack is named after the block it was compiled for."""
    position = {node: i for i, node in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    every = {record.names[0]: record.names for record in placement.records()}
    names = []
    for r in regions:
        local = r.region.name
        chosen = []
        for i in (position.get(param) for param in r.region.params):
            if i not in plan.offloaded_inputs:
                continue
            aliases = every.get(plan.offloaded_inputs[i], (plan.offloaded_inputs[i],))
            mine = [n for n in aliases if f".{n.rpartition('.')[0]}".endswith(f".{local}")]
            chosen.append((mine or aliases)[0])
        names.append(common_module(chosen) or local)
    return names


def _nbytes(node: fx.Node) -> int:
    value = node.meta.get("val", node.meta.get("example_value"))
    return getattr(value, "nbytes", 0)


def _bytes(n: float) -> str:
    if n < 10 * 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def _code(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=True)
