"""Where, in an FX graph, each offloaded module's parameters are used.

A region is one call of an offloaded module: the nodes that Dynamo recorded under that call in
``node.meta["nn_module_stack"]`` (whose keys are ``str(id(module))``, with ``@n`` for the n-th
repeated call) and that read offloaded parameters. A node takes the outermost offloaded module
on its stack. A node that reads an offloaded parameter outside every offloaded module (a tied
output head, a parameter read in a parent's ``forward``) forms a region of its own module call,
or of itself when it has no module.

Works the same on Dynamo graphs, AOTAutograd graphs and Inductor's post-grad graphs: all three
keep placeholders in the same order and carry ``nn_module_stack``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fx_offload.estimate import DeviceFigures

_ROOT = re.compile(r"^[LG]\[(['\"])[^'\"]*\1\]")
_DICT_ATTR = re.compile(r"\._(?:modules|parameters|buffers)\[(['\"])([^'\"\]]+)\1\]")
_INDEX = re.compile(r"\[(['\"]?)([^'\"\]]+)\1\]")


@dataclass(frozen=True)
class GraphPlan:
    """What the pass needs to know about one graph.

    Attributes:
        offloaded_inputs: placeholder position -> name of the offloaded parameter it carries.
        region_modules: ``nn_module_stack`` keys (without ``@n``) of offloaded modules.
        prefetch: at most ``prefetch + 1`` regions' weights on the device at once, the heads
            among them (0: each region fetched just before it, one at a time).
        device_type: the device the graph computes on; ops touching other memory are barriers.
        prefetch_head: how many of the graph's first regions (heads, at most ``prefetch``) are
            served from persistent buffers refilled for the next call after this one (their
            copies then overlap the gap before the next call and the CPU time before its replay
            instead of delaying its start).
        head_regions: where the backend chose the heads (the first regions of Dynamo's graph,
            whose buffers the compiled function's wrapper holds), each as its name and the
            positions of its weights among the graph's inputs: the pass serves those wherever
            Inductor's graph runs them, reading all those weights (Inductor may have dropped a
            read). Empty: the first ``prefetch_head`` regions of the graph the pass rewrites.
        swapped_inputs: placeholder position -> (parameter name, component name) of parameters
            under the ``swap`` policy: read from their component's fixed device copy.
        swapped_as_inputs: of those, the positions that the compiled function's wrapper passes
            as the device copies themselves (the graph only reads them): the pass leaves their
            reads as they are, so the graph is the resident one's.
        heads_as_inputs: whether the compiled function's wrapper passes the heads' buffers as the
            graph's inputs at ``head_regions``' positions (the graph only reads those weights):
            the pass leaves every read of those weights as it is, whichever region makes it, and
            the wrapper copies, waits for and refills the heads around each call.
        refill_in_graph: of the heads' refill for the next call, the first bytes the graph
            copies itself after its last fetch (they overlap its last compute; the wrapper copies
            the rest when the call returns); ``options.AUTO``: as many as that compute hides, estimated
            with ``device_figures`` (the whole heads without them).
    """

    offloaded_inputs: Mapping[int, str]
    region_modules: frozenset[str] = frozenset()
    prefetch: int = 1
    device_type: str = "cpu"
    prefetch_head: int = 1
    head_regions: tuple[tuple[str, tuple[int, ...]], ...] = ()
    swapped_inputs: Mapping[int, tuple[str, str]] = field(default_factory=dict)
    swapped_as_inputs: frozenset[int] = frozenset()
    heads_as_inputs: bool = False
    refill_in_graph: int | str = 0  # or options.AUTO: estimated per graph (``rewrite._auto_in_graph``)
    device_figures: DeviceFigures | None = None  # for AUTO; measured on the device, not in cache keys

    def components_passed(self) -> dict[str, list[int]]:
        """Swapped components whose device copies the wrapper passes as inputs: component name ->
        the positions of those inputs, in order."""
        passed: dict[str, list[int]] = {}
        for i in sorted(self.swapped_as_inputs):
            passed.setdefault(self.swapped_inputs[i][1], []).append(i)
        return passed


@dataclass
class Region:
    """One call of an offloaded module and the offloaded parameters it reads."""

    key: str
    name: str
    params: list[fx.Node] = field(default_factory=list)
    users: list[fx.Node] = field(default_factory=list)


def common_module(parameter_names: Iterable[str]) -> str:
    """The innermost module holding every parameter named (``visual.blocks.0.mlp`` for its
    ``fc1.weight`` and ``fc2.bias``), as the model names it; "" for none."""
    paths = [name.split(".")[:-1] for name in parameter_names]
    same = itertools.takewhile(lambda parts: len(set(parts)) == 1, zip(*paths))
    return ".".join(parts[0] for parts in same)


def module_name(path: str) -> str:
    """Turn a Dynamo source path (``L['self'].layers[0]._modules['mlp']``) into ``layers.0.mlp``."""
    path = _ROOT.sub("", path)
    path = _DICT_ATTR.sub(r".\2", path)
    path = _INDEX.sub(r".\2", path)
    return path.lstrip(".")


def module_calls(graph: fx.Graph) -> dict[str, str]:
    """Every module called in ``graph``: its ``nn_module_stack`` key (without ``@n``) -> its name."""
    calls: dict[str, str] = {}
    for node in graph.nodes:
        for key, (path, _cls) in (node.meta.get("nn_module_stack") or {}).items():
            calls[key.split("@")[0]] = module_name(path)
    return calls


def find_regions(graph: fx.Graph, plan: GraphPlan) -> list[Region]:
    """Group the reads of offloaded placeholders by module call, in order of first read; each
    region's parameters in the order of the graph's inputs.

    Input order, not read order: the backend finds a graph's regions in Dynamo's graph, and the
    pass in the graph Inductor lowers, whose passes may reorder the reads within a region (Flux's
    double-stream block reads its text projections first there); both must list a head region's
    weights alike, since the wrapper's head buffers and the graph's ``head`` are matched by them."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    offloaded = {placeholders[i]: name for i, name in plan.offloaded_inputs.items()}
    regions: dict[str, Region] = {}
    params: dict[str, set[fx.Node]] = {}  # each region's params as a set, for a linear pass
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        reads = [arg for arg in node.all_input_nodes if arg in offloaded and not is_write_back(node, arg)]
        if not reads:
            continue
        key, name = _region_of(node, plan.region_modules)
        region = regions.setdefault(key, Region(key, name))
        for param in reads:
            if param not in params.setdefault(key, set()):
                params[key].add(param)
                region.params.append(param)
        region.users.append(node)
    order = {node: i for i, node in enumerate(placeholders)}
    for region in regions.values():
        region.params.sort(key=order.__getitem__)
    return list(regions.values())


def is_write_back(node: fx.Node, param: fx.Node) -> bool:
    """Whether ``node`` stores an in-place write of the graph input ``param`` (``p.mul_(2)`` in a
    forward): functionalization leaves it as ``copy_(param, new_value)``. It writes the parameter
    itself, so it is no read of a region and is never rewired to a fetched copy."""
    return node.target is torch.ops.aten.copy_.default and node.args[0] is param


def _region_of(node: fx.Node, region_modules: frozenset[str]) -> tuple[str, str]:
    stack = list((node.meta.get("nn_module_stack") or {}).items())
    for key, (path, _cls) in stack:
        if key.split("@")[0] in region_modules:
            return key, _display(key, path)
    if stack:
        key, (path, _cls) = stack[-1]
        return key, _display(key, path) + " (not offloaded)"
    return f"node:{node.name}", f"<{node.name}>"


def _display(key: str, path: str) -> str:
    name = module_name(path) or "<root>"
    call = key.split("@")[1] if "@" in key else None
    return f"{name}@{call}" if call else name
