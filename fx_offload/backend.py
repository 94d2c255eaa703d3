"""``offload_inductor``: the offload pass, then Inductor; and ``offload_eager``, its light twin.

Both are Dynamo backends (registered through the ``torch_dynamo_backends`` entry point). For
each graph Dynamo hands over, ``graph_plan`` decides everything once, in one pass over the
graph's inputs: their parameter records, the regions, the window, the head buffers and the
swapped inputs, into a ``GraphSetup``. Its ``GraphPlan`` (which placeholders carry offloaded
parameters, which module calls are regions, the window) is what the pass reads; its
``runtime.GraphRuntime`` (the head buffers) belongs to the wrapper around the compiled graph,
which lives as long as Dynamo keeps the graph. Then:

* ``offload_inductor`` compiles with Inductor and runs ``rewrite`` as Inductor's
  ``post_grad_custom_post_pass``, on the graph Inductor is about to lower;
* ``offload_eager`` runs AOTAutograd and ``rewrite`` on its forward graph, and executes that
  graph without Inductor (fast to compile: for tests and ``explain``).

``options`` are those of ``torch.compile``, read by ``Options.from_mapping``: ``prefetch`` and
``prefetch_head`` (the window: at most ``prefetch + 1`` regions' weights on the device at once,
the first ``prefetch_head`` of a graph's regions among them, copied in between calls; see
``window``), ``refill_in_graph`` (bytes of that copy issued inside the call, after its last fetch)
and ``offload`` (patterns placed at the first compile) are ours; every other key goes to Inductor.

Whether a graph has "nothing to offload" is decided from the graph itself: its inputs, its
modules, and whether its parameters belong to an offloaded model; never from other models.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import operator
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn
from torch._dynamo.eval_frame import innermost_fn
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.multiprocessing.reductions import StorageWeakRef

from fx_offload import estimate, logs, matching, ops, placement, runtime, swap
from fx_offload import plan as offload_plan
from fx_offload.options import AUTO, OffloadOptionError, Options
from fx_offload.regions import GraphPlan, find_regions, module_calls, module_name
from fx_offload.rewrite import RewrittenRegion, has_barrier, rewrite

# Regions fetched ahead of the one computing where no region is a head (docs/design.md: deeper
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
    another computes); ``prefetch`` is ``default_prefetch(heads)``. (``graph_plan`` makes every
    region a head in a piece of a stack's block whose heads it passes: ``one_block_of_a_stack``.)
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
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(parsed.inductor)
    # under CUDA graphs a replay runs no op anyway: swapped weights keep their ops there
    cudagraphs = patches.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs)
    setup = graph_plan(gm, example_inputs, parsed, swapped_as_inputs=not cudagraphs)
    if setup.rewrites:
        inner = patches.get("post_grad_custom_post_pass", torch._inductor.config.post_grad_custom_post_pass)
        patches["post_grad_custom_post_pass"] = OffloadPass(setup.plan, inner)
    return _around_calls(compile_fx(gm, example_inputs, config_patches=patches), setup)


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

    setup = graph_plan(gm, example_inputs, Options.from_mapping(options))

    def forward_compiler(aot_gm: fx.GraphModule, _inputs):
        if setup.rewrites:
            run_pass(aot_gm, setup.plan)
        return make_boxed_func(aot_gm.forward)

    def backward_compiler(aot_gm: fx.GraphModule, _inputs):
        return make_boxed_func(aot_gm.forward)

    compiled = aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler)(gm, example_inputs)
    return _around_calls(compiled, setup)


class OffloadPass(CustomGraphPass):
    """``rewrite`` as an Inductor post-grad pass, after any pass the user had set there."""

    def __init__(self, plan: GraphPlan, inner=None) -> None:
        self.plan = plan
        self.inner = inner

    def __call__(self, graph: fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)
        ops.lower_in_inductor()
        run_pass(graph.owning_module, self.plan)

    def uuid(self) -> bytes:
        inner = self.inner.uuid() if hasattr(self.inner, "uuid") else repr(self.inner)
        return digest(repr(_plan_key(self.plan)), repr(inner))


@dataclass(eq=False)
class GraphSetup:
    """Everything fx_offload decides about one graph at compile time, made once by ``graph_plan``.

    The pass reads ``plan`` (through ``OffloadPass`` or ``run_pass``); the compiled function's
    wrapper owns ``runtime`` (the graph's head buffers) and reads ``swapped_positions`` (which
    inputs are swapped weights, whose components it puts on the device before each call).
    Parameters are not held here: the graph outlives the models it ran.
    """

    plan: GraphPlan
    runtime: runtime.GraphRuntime
    swapped_positions: tuple[int, ...] = ()

    @property
    def rewrites(self) -> bool:
        """Whether the pass has anything to do on this graph."""
        return bool(self.plan.offloaded_inputs or self.plan.swapped_inputs)


def graph_plan(
    gm: fx.GraphModule, example_inputs: list, options: Options, *, swapped_as_inputs: bool = True
) -> GraphSetup:
    """Decide, once per graph, what offload does with ``gm``: inputs -> parameter records ->
    regions -> window -> heads -> swapped components.

    With ``options.offload``, first places the parameters those patterns select (as
    ``fx_offload.offload`` would), naming modules as the user does, relative to the compiled root.
    ``swapped_as_inputs``: whether the wrapper may pass device copies as the graph's inputs (no
    CUDA graphs): swapped weights that the graph only reads (``GraphPlan.swapped_as_inputs``), and
    head buffers (``GraphPlan.heads_as_inputs``, unless ``options.heads_as_inputs`` is off).
    """
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    position = {node: i for i, node in enumerate(placeholders)}
    region_modules: set[str] = set()
    if options.offload is not None:
        region_modules |= _place_by_patterns(gm, placeholders, example_inputs, options.offload)
    records = _records_of(example_inputs)
    offloaded = {i: r.names[0] for i, r in records.items() if r.component is None}
    swapped = {i: (r.names[0], r.component.name) for i, r in records.items() if r.component is not None}
    device_type = next(iter(records.values())).device.type if records else "cpu"
    for node in gm.graph.nodes:
        for key in node.meta.get("nn_module_stack") or {}:
            if placement.is_region_module(key):
                region_modules.add(key.split("@")[0])
    _refuse_resident_in_offloaded(gm, position, example_inputs, records)
    if not records and options.offload is None and not region_modules:
        _refuse_nothing_to_offload(example_inputs)
    plan = GraphPlan(offloaded, frozenset(region_modules), 0, device_type, 0, swapped_inputs=swapped)
    regions = find_regions(gm.graph, plan) if offloaded else []
    sizes = []
    if not has_barrier(gm.graph, device_type):  # heads cannot cross a partition
        sizes = [sum(example_inputs[position[p]].nbytes for p in region.params) for region in regions]
    prefetch, heads = window(sizes, options.prefetch, options.prefetch_head)
    as_inputs = swapped_as_inputs and not _trains(gm, example_inputs)
    region_inputs = tuple((region.name, tuple(position[p] for p in region.params)) for region in regions)
    whole = bool(
        as_inputs
        and sizes
        and sum(sizes) <= HEAD_BYTES
        and options.prefetch == options.prefetch_head == AUTO
        and pass_heads(options, device_type, len(sizes), len(sizes))
        and _passable(example_inputs, placeholders, region_inputs)
        and one_block_of_a_stack([records[i] for i in offloaded])
    )
    if whole:  # a piece of a stack's block: every region a head, passed as inputs
        prefetch, heads = default_prefetch(len(sizes)), len(sizes)
        logs.planned(sizes, prefetch, heads, options, "every region a head: one block of a stack, passed")
    elif regions:  # (a graph without offloaded weights has no window to tell)
        logs.planned(sizes, prefetch, heads, options)
    in_graph = options.refill_in_graph
    figures = estimate.device_figures(device_type) if in_graph == AUTO and heads else None
    plan = dataclasses.replace(
        plan, prefetch=prefetch, prefetch_head=heads, refill_in_graph=in_graph, device_figures=figures
    )
    components: dict[swap.Component, None] = {}
    for i in sorted(swapped):
        components.setdefault(records[i].component, None)
    swap.check_together(list(components))
    if as_inputs:
        plan = dataclasses.replace(plan, swapped_as_inputs=_only_read(placeholders, swapped))
    graph = runtime.GraphRuntime()
    if heads and offloaded:  # window gave a graph split by a barrier none
        chosen = region_inputs[:heads]
        passed = whole or (  # (judged above for the whole graph)
            as_inputs
            and pass_heads(options, device_type, heads, len(regions))
            and _passable(example_inputs, placeholders, chosen)
        )
        if passed:  # a head whose weights an earlier one holds would be buffers no read reaches
            kept, held = [], set()
            for name, positions in chosen:
                if not held.issuperset(positions):
                    kept.append((name, positions))
                    held.update(positions)
            chosen = tuple(kept)
            # one set of buffers per device for them all: the wrapper checks, passes and refills
            # it at once (on its device's streams)
            by_device: dict[torch.device, dict[int, None]] = {}
            for _, positions in chosen:
                for i in positions:
                    by_device.setdefault(example_inputs[i].device, {})[i] = None
            for positions in by_device.values():
                graph.declare_head(example_inputs, list(positions), chosen[0][0], passed=True)
        else:
            for name, positions in chosen:
                graph.declare_head(example_inputs, list(positions), name)
        plan = dataclasses.replace(plan, head_regions=chosen, heads_as_inputs=passed)
    return GraphSetup(plan, graph, tuple(sorted(swapped)))


def one_block_of_a_stack(records: list[placement.HostParameter]) -> bool:
    """Whether the offloaded parameters of a graph (``records``) all lie in one block of a stack
    (``layers.3`` of ``layers.3.mlp.fc1.weight``: the last numbered module of their names) whose
    other blocks hold offloaded parameters of the same names and shapes. Dynamo reuses such a
    graph for every block (the weights are its inputs), so the weights it keeps on the device
    between calls are one block's, not the stack's. One scan of the offloaded parameters, once
    per graph compiled."""
    blocks = {_block_of(record.names[0]) for record in records}
    if len(blocks) != 1 or None in blocks:
        return False
    ((prefix, index),) = blocks
    prefix = list(prefix)
    first = records[0]
    rest = first.names[0].split(".")[len(prefix) + 1 :]
    for other in placement.records():
        for name in other.names:
            parts = name.split(".")
            if (
                len(parts) == len(prefix) + 1 + len(rest)
                and parts[len(prefix)] != index
                and parts[len(prefix)].isdigit()
                and parts[: len(prefix)] == prefix
                and parts[len(prefix) + 1 :] == rest
                and other.host.shape == first.host.shape
            ):
                return True
    return False


def _block_of(name: str) -> tuple[tuple[str, ...], str] | None:
    """(the names before the last numbered module in ``name``, its number), or None."""
    parts = name.split(".")
    numbered = [k for k, part in enumerate(parts[:-1]) if part.isdigit()]
    return (tuple(parts[: numbered[-1]]), parts[numbered[-1]]) if numbered else None


def _passable(example_inputs: list, placeholders: list[fx.Node], heads: tuple) -> bool:
    """Whether head regions ``heads`` (name, input positions) can be passed as the graph's inputs:
    weights the graph only reads, contiguous as the buffers are (any region may read them)."""
    weights = sorted({i for _, positions in heads for i in positions})
    if not all(example_inputs[i].is_contiguous() for i in weights):
        return False
    return _only_read(placeholders, weights) == frozenset(weights)


def pass_heads(options: Options, device_type: str, heads: int, regions: int) -> bool:
    """``options.heads_as_inputs`` for a graph of ``regions`` regions, ``heads`` of them heads,
    on ``device_type``, before the graph's own conditions. A ``refill_in_graph`` asked for needs
    the graph's refill op."""
    if options.refill_in_graph not in (AUTO, 0) or not options.heads_as_inputs:
        return False
    return options.heads_as_inputs is True or device_type == "cpu" or heads == regions


def _trains(gm: fx.GraphModule, example_inputs: list) -> bool:
    """Whether AOTAutograd makes a training graph of ``gm``: its wrapper must then get the
    parameters themselves, whose gradients it computes. Grad on at the graph's start with an
    input that requires grad, or an output that requires grad (a ``forward`` may turn grad on
    inside ``no_grad``)."""
    if torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in example_inputs):
        return True
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    values = [node.meta.get("example_value") for node in output.all_input_nodes]
    leaves = torch.utils._pytree.tree_leaves(values)
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in leaves)


def _only_read(placeholders: list[fx.Node], positions) -> frozenset[int]:
    """The positions among ``positions`` whose input Dynamo's graph only reads: its example
    value's version counter did not move while Dynamo traced (an in-place write of it or of a view
    of it, by any op), no call that looks like a write takes it or a view (``_writes``), and no
    view of it is among the outputs (views found by the storage of Dynamo's example values, also
    inside tuples). The wrapper can pass such a swapped parameter's device copy in its place."""
    found = set()
    for i in positions:
        param = placeholders[i]
        value = param.meta.get("example_value")
        if not isinstance(value, torch.Tensor) or value._version != 0:  # fakes start at 0
            continue
        storage = StorageWeakRef(value.untyped_storage())
        aliases, todo, plain = {param}, [param], True
        while todo and plain:
            for user in todo.pop().users:
                if user.op == "output" or _writes(user, aliases):
                    plain = False
                    break
                leaves = torch.utils._pytree.tree_leaves(user.meta.get("example_value"))
                shares = any(
                    isinstance(v, torch.Tensor) and StorageWeakRef(v.untyped_storage()) == storage
                    for v in leaves
                )
                if shares and user not in aliases:
                    aliases.add(user)
                    todo.append(user)
        if plain:
            found.add(i)
    return frozenset(found)


def _writes(node: fx.Node, aliases: set[fx.Node]) -> bool:
    """Whether ``node`` may write one of ``aliases`` in place: an op whose schema writes an
    argument, an in-place method or function, ``out=``, ``inplace=True``, item assignment; judged
    by schema or name, erring towards yes. (``_only_read`` also reads the version counter, which
    every in-place op moves; a write both miss is caught after AOTAutograd, in ``rewrite``.)"""
    if not any(a in aliases for a in node.all_input_nodes):
        return False
    if node.op not in ("call_function", "call_method"):
        return node.op != "call_module"  # (a call_module is a plain module call: reads)
    if isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        overloads = (
            [node.target]
            if isinstance(node.target, torch._ops.OpOverload)
            else [getattr(node.target, name) for name in node.target.overloads()]
        )
        return any(arg.alias_info is not None and arg.alias_info.is_write
                   for op in overloads for arg in op._schema.arguments)  # fmt: skip
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    dunder = name.startswith("__") and name.endswith("__")
    return (
        (name.endswith("_") and not dunder)  # x.add_(...), torch.Tensor.copy_
        or name in _IN_PLACE_OPERATORS
        or (dunder and name.strip("_") in _IN_PLACE_OPERATORS)  # x.__iadd__(...)
        or "out" in node.kwargs
        or bool(node.kwargs.get("inplace"))  # F.relu(p, inplace=True)
    )


_IN_PLACE_OPERATORS = {
    f.__name__
    for f in (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
              operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
              operator.ixor, operator.ilshift, operator.irshift, operator.setitem)
}  # fmt: skip


def _records_of(example_inputs: list) -> dict[int, placement.HostParameter]:
    """The records of the offloaded parameters among a graph's inputs, by position; refuses an
    input whose parameter was offloaded but whose data was replaced since."""
    records: dict[int, placement.HostParameter] = {}
    for i, example in enumerate(example_inputs):
        if not isinstance(example, torch.Tensor):
            continue
        stale = placement.replaced(example)
        if stale is not None:
            raise ValueError(
                f"offloaded parameter {stale.names[0]!r} no longer holds its host memory: its data "
                "was replaced after offload (model.to(), .half(), load_state_dict(assign=True)?). "
                "Compiling it now would keep it on the device unannounced. Call "
                "fx_offload.restore(model) first, change the model, then offload it again"
            )
        record = placement.lookup(example)
        if record is not None:
            records[i] = record
    return records


def _refuse_nothing_to_offload(example_inputs: list) -> None:
    """A graph without offloaded parameters or modules: fine as a piece of an offloaded model (a
    graph break left it outside the offloaded modules), refused where its parameters belong to no
    offloaded model. Decided from this graph's own parameters, whatever else is offloaded."""
    params = [example for example in example_inputs if isinstance(example, nn.Parameter)]
    if params and not offload_plan.holds_offloaded_model_parameters(params):
        raise ValueError(
            "fx_offload's backend has nothing to offload: call fx_offload.offload(model, patterns) "
            "before compiling, or pass torch.compile(..., options={'offload': [module names]}). "
            "A model given back with fx_offload.restore is resident: compile it anew with "
            "torch.compile(model)"
        )


def _refuse_resident_in_offloaded(gm, position, example_inputs, offloaded) -> None:
    """A parameter read inside an offloaded module must be offloaded: else it was swapped in later."""
    for node in gm.graph.nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).items())
        if node.op == "placeholder" or not stack or not placement.is_region_module(stack[-1][0]):
            continue
        for arg in node.all_input_nodes:
            i = position.get(arg)
            example = example_inputs[i] if i is not None else None
            if (
                isinstance(example, nn.Parameter)
                and example.numel()
                and i not in offloaded
                and not placement.is_kept(example)
            ):
                raise ValueError(
                    f"module {module_name(stack[-1][1][0])!r} is offloaded but reads a resident "
                    f"{tuple(example.shape)} parameter: a parameter was replaced after offload "
                    "(load_state_dict(assign=True), a new nn.Parameter?). Call "
                    "fx_offload.restore(model) first, change the model, then offload it again"
                )


def _place_by_patterns(gm, placeholders, example_inputs, patterns) -> set[str]:
    """Place the parameters of the modules ``patterns`` select, named as the user names them
    (``layers.0.fc1``, relative to the compiled root); return the selected modules' call keys."""
    params: dict[str, nn.Parameter] = {}
    for node, example in zip(placeholders, example_inputs):
        grapharg = node.meta.get("grapharg")
        if isinstance(example, nn.Parameter) and grapharg is not None and grapharg.source is not None:
            params.setdefault(module_name(grapharg.source.name), example)
    if offload_plan.holds_offloaded_model_parameters(list(params.values())):
        raise OffloadOptionError(
            f"options['offload']={list(patterns)!r} places parameters at the first compile, but this "
            "model was already offloaded with fx_offload.offload: drop options['offload'], or call "
            "fx_offload.restore(model) first"
        )
    calls = module_calls(gm.graph)
    names = {""} | set(calls.values())
    for name in params:
        names |= set(matching.prefixes(name.rpartition(".")[0]))
    try:
        selected = matching.select(patterns, sorted(names))
    except ValueError as error:
        raise OffloadOptionError(f"options['offload']: {error}") from None
    roots = {name for hits in selected.values() for name in hits}
    owned: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in params.items():
        if param.numel() and matching.is_within(name.rpartition(".")[0], roots):
            owned.setdefault(id(param), (param, []))[1].append(name)
    if owned:
        device = next(iter(owned.values()))[0].device
        records = placement.place([(p, tuple(n)) for p, n in owned.values()], device, None)
        offload_plan.note_placed_by_backend(records, patterns, roots)
    return {key for key, name in calls.items() if matching.is_within(name, roots)}


def is_backward(graph: fx.Graph) -> bool:
    """Whether ``graph`` is AOTAutograd's backward graph (its inputs are tangents and saved values)."""
    return any(node.op == "placeholder" and node.name.startswith("tangents") for node in graph.nodes)


def _around_calls(compiled, setup: GraphSetup):
    """Wrap a compiled graph so every call (CUDA-graph replays too) first puts its swapped
    components on the device and makes its heads hold the call's weights, and after the call
    refills its heads and starts the copy of the next call's. A graph with neither is returned
    as it is: its calls cost nothing more than the compiled graph's."""
    graph = setup.runtime
    components = None
    if setup.swapped_positions:
        components = _SwappedInputs(setup.swapped_positions, setup.plan.swapped_as_inputs)
    if components is None and not graph.has_heads:
        return compiled
    boxed = getattr(compiled, "_boxed_call", False)
    # The compiled graph comes wrapped in Dynamo's ``disable`` (its frames must not be traced),
    # which ``run`` takes over: Dynamo wraps a backend's function in one ``disable`` of the
    # innermost function, so ``compiled``'s own would be a second per call (eval-frame switches
    # and a Python frame: a few microseconds, on hundreds of graph calls per forward).
    compiled = innermost_fn(compiled)
    enter, leave, passes = graph.enter, graph.leave, graph.passes

    def run(*args):
        # a boxed call passes one list of inputs (whether Dynamo boxes depends on the path)
        boxed_call = len(args) == 1 and isinstance(args[0], list)
        inputs = args[0] if boxed_call else args
        if components is not None:
            inputs = components.ensure(inputs)
            args = (inputs,) if boxed_call else inputs
        heads = enter(inputs)
        try:
            if passes:
                inputs = graph.passed(inputs, heads)
                args = (inputs,) if boxed_call else inputs
            return compiled(*args)
        finally:
            leave(heads)

    def run_swapped(*args):  # swapped inputs only, no heads
        if len(args) == 1 and isinstance(args[0], list):
            return compiled(components.ensure(args[0]))
        return compiled(*components.ensure(args))

    if not graph.has_heads:
        run = run_swapped

    if boxed:
        run._boxed_call = True
    return torch._dynamo.disable(run, reason="an fx_offload wrapper of a compiled graph")


class _SwappedInputs:
    """A graph's swapped inputs, and the components they belong to in the call running.

    Found from the call's own weights (a graph Dynamo reuses for every block of a stack, for
    another model, or for the same model offloaded again, reads other components), kept per set of
    weights (their identities) until ``placement.generation`` moves; records and components are
    held weakly.

    A call whose weights are unchanged since they last came (their version counters, read by a
    C-level map), with their components on the device, does no per-parameter work in Python: a
    component's weights keep their arena addresses, and a swap-in copies their current values.
    While a component's swap-in lands (``swap.Arena.wait_for``), the call waits for the pieces up
    to the last record it reads. Once they have all landed, and until a component comes or goes
    in their arena (``swap.Arena.moves``), such a call does not look at its components either:
    one compare of a count per arena.
    """

    def __init__(self, positions: tuple[int, ...], as_inputs: frozenset[int] = frozenset()) -> None:
        self.positions = positions
        take = operator.itemgetter(*positions)
        self._take = take if len(positions) != 1 else (lambda inputs: (take(inputs),))
        self.as_inputs = tuple(p for p in positions if p in as_inputs)  # passed as their copies
        # identities of a call's swapped weights -> [generation, groups, versions, the device
        # copies of the weights at ``as_inputs``, per group the position of its last record, the
        # counts of their arenas' ``moves`` when all had landed (None: some had not), those cells]
        self._seen: dict[tuple[int, ...], list] = {}

    def ensure(self, inputs):
        """Put the components the call reads on the device, with their current values; return
        the inputs to call the graph with: ``inputs``, or a list where the weights at
        ``as_inputs`` are their device copies (a boxed call's own list, changed in place: the
        compiled function owns it and empties it; ``runtime.replaced``)."""
        weights = self._take(inputs)
        ids = tuple(map(id, weights))
        with placement.plain_reads():
            versions = tuple(map(_VERSION, weights))
        generation = placement.generation()
        entry = self._seen.get(ids)
        if entry is not None and entry[0] == generation:
            groups = entry[1]
            if entry[2] == versions:
                if entry[5] == tuple(map(_FIRST, entry[6])):  # landed then, nothing came or went since
                    copies = entry[3]  # (``_passed``, in line: this is every call's path)
                    return runtime.replaced(inputs, self.as_inputs, copies) if copies else inputs
                for (component_ref, _), last in zip(groups, entry[4]):
                    component = component_ref()
                    if component is None or not component.resident:
                        break
                    if component.landing:
                        component.arena.wait_for(component, last)
                else:
                    entry[5] = self._settled(groups, entry[6])
                    return self._passed(inputs, entry[3])  # the same weights, unchanged, in place
        else:
            if entry is not None or len(self._seen) >= _KEPT:
                self._seen.clear()
            groups = self._group(inputs)
        live = []
        for component_ref, record_refs in groups:
            component = component_ref()
            records = [ref() for ref in record_refs]
            if component is None or any(record is None for record in records):
                self._seen.pop(ids, None)
                return self.ensure(inputs)
            live.append((component, records))
        for component, records in live:
            component.arena.ensure(component, records)
        copies = tuple(runtime.swapped([inputs[p] for p in self.as_inputs]))
        lasts = tuple(component.last_of(records) for component, records in live)
        cells = tuple({id(c.arena): c.arena.moves for c, _ in live}.values())
        self._seen[ids] = [generation, groups, versions, copies, lasts, self._settled(groups, cells), cells]
        return self._passed(inputs, copies)

    @staticmethod
    def _settled(groups, cells: tuple[list[int], ...]) -> tuple[int, ...] | None:
        """The counts of ``cells`` (the components' arenas' ``moves``) if every component of
        ``groups`` has landed (no piece left to wait for), else None: until one moves, a call of
        the same weights, unchanged, needs no look at its components."""
        for component_ref, _ in groups:
            component = component_ref()
            if component is None or component.landing:
                return None
        return tuple(map(_FIRST, cells))

    def _passed(self, inputs, copies: tuple):
        return runtime.replaced(inputs, self.as_inputs, copies) if copies else inputs

    def _group(self, inputs) -> list[tuple[weakref.ref, list[weakref.ref]]]:
        groups: dict[swap.Component, list] = {}
        for i in self.positions:
            record = placement.lookup(inputs[i])
            if record is None or record.component is None or record.component.arena is None:
                what = f"parameter {record.names[0]!r}" if record is not None else f"input {i}"
                raise RuntimeError(
                    f"a compiled graph reads {what} as swapped, but it is no longer swapped "
                    "(restored, and offloaded again with another policy?). Call "
                    "torch._dynamo.reset() and compile the model again"
                )
            groups.setdefault(record.component, []).append(record)
        swap.check_together(list(groups))
        return [
            (weakref.ref(component), [weakref.ref(r) for r in records])
            for component, records in groups.items()
        ]


_KEPT = 1 << 12  # sets of swapped weights a graph remembers (then it forgets them all)
_VERSION = operator.attrgetter("_version")
_FIRST = operator.itemgetter(0)


def run_pass(gm: fx.GraphModule, plan: GraphPlan) -> None:
    """Run the offload pass (``rewrite``) on ``gm`` for ``plan``, then tell the listeners."""
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
        plan.head_regions,
        sorted(plan.swapped_inputs.items()),
        sorted(plan.swapped_as_inputs),
        plan.heads_as_inputs,
        plan.refill_in_graph,
    )


@functools.cache
def _source_digest() -> str:
    package = Path(__file__).parent
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(package.glob("*.py")))).hexdigest()


def digest(*parts: str) -> bytes:
    """A cache key for an offload pass configured by ``parts``: changes with the package's code."""
    return hashlib.sha256("\0".join((_source_digest(), *parts)).encode()).digest()
