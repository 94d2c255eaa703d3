"""``offload_inductor``: the offload pass, then Inductor; and ``offload_eager``, its light twin.

Both are Dynamo backends (registered through the ``torch_dynamo_backends`` entry point). For
each graph Dynamo hands over they decide which placeholders carry offloaded parameters and
which module calls are regions (a ``GraphPlan``), then:

* ``offload_inductor`` compiles with Inductor and runs ``rewrite`` as Inductor's
  ``post_grad_custom_post_pass``, on the graph Inductor is about to lower;
* ``offload_eager`` runs AOTAutograd and ``rewrite`` on its forward graph, and executes that
  graph without Inductor (fast to compile: for tests and ``explain``).

``options`` are those of ``torch.compile``, read by ``Options.from_mapping``: ``prefetch`` and
``prefetch_head`` (the window: at most ``prefetch + 1`` regions' weights on the device at once,
the first ``prefetch_head`` of a graph's regions among them, copied in between calls; see
``window``), ``refill_in_graph`` (bytes of that copy issued inside the call, after its last fetch)
and ``offload`` (patterns placed at the first compile) are ours; every other key goes to Inductor.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass

from fx_offload import estimate, logs, matching, placement, runtime, swap
from fx_offload.options import AUTO, Options
from fx_offload.regions import GraphPlan, find_regions, module_calls, module_name
from fx_offload.rewrite import RewrittenRegion, has_barrier, rewrite

# Regions fetched ahead of the one computing where no region is a head (RESULTS.md: deeper
# windows did not beat this within the noise on the H100 cases).
DEFAULT_PREFETCH = 2
# The heads cover at least this many bytes (and at least one region): ~0.9 ms of copying at
# 55 GB/s, more than the 0.35-0.6 ms of CPU time a compiled call spends before its CUDA graph
# starts on the H100 hosts measured, so the copy engine is busy while the call is issued.
HEAD_BYTES = 48 << 20
# Called after every rewrite with (graph module, plan, regions): explain() and tests listen.
listeners: list[Callable[[fx.GraphModule, GraphPlan, list[RewrittenRegion]], None]] = []


def window(sizes: Sequence[int], prefetch: int | str, head: int | str) -> tuple[int, int]:
    """``(prefetch, heads)`` for a graph whose regions hold ``sizes`` bytes, in the order they run.

    At most ``prefetch + 1`` regions' weights are on the device during a call, the ``heads``
    among them (the first regions, copied in between calls). Chosen where ``AUTO``: as many first
    regions as make ``HEAD_BYTES``, at least one and at most half the graph's regions (so that
    offloading still keeps most of a small graph's weights off the device between calls), and at
    most ``prefetch - 1`` when ``prefetch`` is given (so one region can still be copied while
    another computes); ``prefetch`` is ``default_prefetch(heads)``.
    """
    if head == AUTO:
        heads = total = 0
        for size in sizes:
            if heads and total >= HEAD_BYTES:
                break
            heads, total = heads + 1, total + size
        heads = min(heads, max(1, len(sizes) // 2))
        if prefetch != AUTO:
            heads = min(heads, max(prefetch - 1, 0))
    else:
        heads = min(head, len(sizes))
    return (default_prefetch(heads) if prefetch == AUTO else prefetch), heads


def default_prefetch(heads: int) -> int:
    """``prefetch`` where ``AUTO``: ``DEFAULT_PREFETCH``, or room for two regions beside ``heads``."""
    return max(DEFAULT_PREFETCH, heads + 1)


def offload_inductor(
    gm: fx.GraphModule,
    example_inputs: list,
    *,
    mode: str | None = None,
    options: Mapping[str, object] | None = None,
):
    """Rewrite ``gm`` for offloaded parameters and compile it with Inductor."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    parsed = Options.from_mapping(options)
    plan = graph_plan(gm, example_inputs, parsed)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(parsed.inductor)
    if plan.offloaded_inputs or plan.swapped_inputs:
        inner = patches.get("post_grad_custom_post_pass", torch._inductor.config.post_grad_custom_post_pass)
        patches["post_grad_custom_post_pass"] = OffloadPass(plan, inner)
    key = _make_heads(gm, example_inputs, plan)
    components = _components(example_inputs, plan)
    return _around_calls(compile_fx(gm, example_inputs, config_patches=patches), key, components)


def offload_eager(
    gm: fx.GraphModule,
    example_inputs: list,
    *,
    mode: str | None = None,
    options: Mapping[str, object] | None = None,
):
    """Rewrite ``gm``'s AOTAutograd forward graph and run it as it is, without Inductor."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    plan = graph_plan(gm, example_inputs, Options.from_mapping(options))

    def forward_compiler(aot_gm: fx.GraphModule, _inputs):
        if plan.offloaded_inputs or plan.swapped_inputs:
            _run_pass(aot_gm, plan)
        return make_boxed_func(aot_gm.forward)

    def backward_compiler(aot_gm: fx.GraphModule, _inputs):
        return make_boxed_func(aot_gm.forward)

    key = _make_heads(gm, example_inputs, plan)
    components = _components(example_inputs, plan)
    compiled = aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler)(gm, example_inputs)
    return _around_calls(compiled, key, components)


class OffloadPass(CustomGraphPass):
    """``rewrite`` as an Inductor post-grad pass, after any pass the user had set there."""

    def __init__(self, plan: GraphPlan, inner=None) -> None:
        self.plan = plan
        self.inner = inner

    def __call__(self, graph: fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)
        _run_pass(graph.owning_module, self.plan)

    def uuid(self) -> bytes:
        inner = self.inner.uuid() if hasattr(self.inner, "uuid") else repr(self.inner)
        return _digest(repr(_plan_key(self.plan)), repr(inner))


def graph_plan(gm: fx.GraphModule, example_inputs: list, options: Options) -> GraphPlan:
    """Which placeholders of ``gm`` carry offloaded parameters, which calls are regions.

    With ``options.offload``, first places the parameters those patterns select (as
    ``fx_offload.offload`` would), naming modules as the graph does, relative to the compiled root.
    """
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    region_modules: set[str] = set()
    if options.offload is not None:
        region_modules |= _place_by_patterns(gm, placeholders, example_inputs, options.offload)
    offloaded: dict[int, str] = {}
    swapped: dict[int, tuple[str, str]] = {}
    device_type = "cpu"
    for i, example in enumerate(example_inputs):
        stale = placement.replaced(example) if isinstance(example, torch.Tensor) else None
        if stale is not None:
            raise ValueError(
                f"offloaded parameter {stale.names[0]!r} no longer holds its host memory: its data "
                "was replaced after offload (model.to(), .half(), load_state_dict(assign=True)?). "
                "Compiling it now would keep it on the device unannounced. Call "
                "fx_offload.restore(model) first, change the model, then offload it again"
            )
        record = placement.lookup(example) if isinstance(example, torch.Tensor) else None
        if record is not None and record.component is not None:
            swapped[i] = (record.names[0], record.component.name)
            device_type = record.device.type
        elif record is not None:
            offloaded[i] = record.names[0]
            device_type = record.device.type
    for node in gm.graph.nodes:
        for key in node.meta.get("nn_module_stack") or {}:
            if placement.is_region_module(key):
                region_modules.add(key.split("@")[0])
    _refuse_resident_in_offloaded(gm, placeholders, example_inputs, {**offloaded, **swapped})
    if not offloaded and options.offload is None and not placement._records and not region_modules:
        raise ValueError(
            "offload_inductor has nothing to offload: call fx_offload.offload(model, patterns) "
            "before compiling, or pass torch.compile(..., options={'offload': ['visual']})"
        )
    plan = GraphPlan(offloaded, frozenset(region_modules), 0, device_type, 0, swapped)
    sizes = []
    if offloaded and not has_barrier(gm.graph, device_type):  # heads cannot cross a partition
        position = {node: i for i, node in enumerate(placeholders)}
        for region in find_regions(gm.graph, plan):
            params = [example_inputs[position[p]] for p in region.params]
            sizes.append(sum(w.nbytes for w in params))
    prefetch, heads = window(sizes, options.prefetch, options.prefetch_head)
    logs.planned(sizes, prefetch, heads, options)
    in_graph = options.refill_in_graph
    figures = estimate.device_figures(device_type) if in_graph == AUTO and heads else None
    plan = dataclasses.replace(
        plan, prefetch=prefetch, prefetch_head=heads, refill_in_graph=in_graph, device_figures=figures
    )
    swap.check_together(list(_components(example_inputs, plan)))
    return plan


def _components(example_inputs: list, plan: GraphPlan) -> dict[swap.Component, list]:
    """The swapped components a graph reads, each with the records of the parameters it reads."""
    found: dict[swap.Component, list] = {}
    for i in sorted(plan.swapped_inputs):
        record = placement.lookup(example_inputs[i])
        if record is not None and record.component is not None:
            found.setdefault(record.component, []).append(record)
    return found


def _refuse_resident_in_offloaded(gm, placeholders, example_inputs, offloaded) -> None:
    """A parameter read inside an offloaded module must be offloaded: else it was swapped in later."""
    position = {node: i for i, node in enumerate(placeholders)}
    for node in gm.graph.nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).items())
        if node.op == "placeholder" or not stack or not placement.is_region_module(stack[-1][0]):
            continue
        for arg in node.all_input_nodes:
            i = position.get(arg)
            example = example_inputs[i] if i is not None else None
            if isinstance(example, nn.Parameter) and example.numel() and i not in offloaded:
                raise ValueError(
                    f"module {module_name(stack[-1][1][0])!r} is offloaded but reads a resident "
                    f"{tuple(example.shape)} parameter: a parameter was replaced after offload "
                    "(load_state_dict(assign=True), a new nn.Parameter?). Call "
                    "fx_offload.restore(model) first, change the model, then offload it again"
                )


def _place_by_patterns(gm, placeholders, example_inputs, patterns) -> set[str]:
    params: dict[str, nn.Parameter] = {}
    for node, example in zip(placeholders, example_inputs):
        grapharg = node.meta.get("grapharg")
        if isinstance(example, nn.Parameter) and grapharg is not None and grapharg.source is not None:
            params.setdefault(module_name(grapharg.source.name), example)
    calls = module_calls(gm.graph)
    names = {""} | set(calls.values())
    for name in params:
        names |= set(matching.prefixes(name.rpartition(".")[0]))
    selected = matching.select(patterns, sorted(names))
    roots = {name for hits in selected.values() for name in hits}
    owned: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in params.items():
        if param.numel() and matching.is_within(name.rpartition(".")[0], roots):
            owned.setdefault(id(param), (param, []))[1].append(name)
    if owned:
        device = next(iter(owned.values()))[0].device
        placement.place([(p, tuple(n)) for p, n in owned.values()], device, None)
    return {key for key, name in calls.items() if matching.is_within(name, roots)}


def _make_heads(gm: fx.GraphModule, example_inputs: list, plan: GraphPlan) -> runtime.GraphKey:
    """Make the graph's head buffers now, at compile time (made at the first call, they would land
    in the pool of a CUDA graph tree that is warming up); return the key under which the graph's
    wrapper finds them before each call."""
    key = runtime.GraphKey()
    if not (plan.prefetch_head and plan.offloaded_inputs):  # graph_plan gave a split graph none
        return key
    position = {node: i for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    for region in find_regions(gm.graph, plan)[: plan.prefetch_head]:
        runtime.declare_head(key, example_inputs, [position[p] for p in region.params], region.name)
    return key


def is_backward(graph: fx.Graph) -> bool:
    """Whether ``graph`` is AOTAutograd's backward graph (its inputs are tangents and saved values)."""
    return any(node.op == "placeholder" and node.name.startswith("tangents") for node in graph.nodes)


def _around_calls(compiled, key: runtime.GraphKey, components: Mapping[swap.Component, list] | None = None):
    """Wrap a compiled graph so every call (CUDA-graph replays too) first puts its swapped
    components on the device and makes its head hold the call's weights."""
    boxed = getattr(compiled, "_boxed_call", False)
    reads = list((components or {}).items())

    def run(*args):
        for component, records in reads:
            if component.arena is not None:
                component.arena.ensure(component, records)
        # a boxed call passes one list of inputs (whether Dynamo boxes depends on the path)
        inputs = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        with runtime.running(key, inputs):
            return compiled(*args)

    if boxed:
        run._boxed_call = True
    return run


def _run_pass(gm: fx.GraphModule, plan: GraphPlan) -> None:
    if is_backward(gm.graph):
        return  # the plan's positions are the forward graph's; a backward reads parameters as saved
    before = logs.graph_before(gm)
    regions = rewrite(gm.graph, plan)
    gm.recompile()
    logs.rewritten(gm, plan, regions, before)
    for listener in list(listeners):
        listener(gm, plan, regions)


def _plan_key(plan: GraphPlan) -> tuple:
    return (
        sorted(plan.offloaded_inputs.items()),
        len(plan.region_modules),
        plan.prefetch,
        plan.device_type,
        plan.prefetch_head,
        sorted(plan.swapped_inputs.items()),
        plan.refill_in_graph,
    )


@functools.cache
def _source_digest() -> str:
    package = Path(__file__).parent
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(package.glob("*.py")))).hexdigest()


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join((_source_digest(), *parts)).encode()).digest()
