"""The user's verbs: ``offload`` a model's matched modules, ``restore`` it, and the printable plan.

The plans live in one registry keyed weakly by model: a model dropped without ``restore`` takes
its plan (and its parameters' host memory) with it. A model whose parameters the backend option
``offload`` placed at compile time has no registered plan; ``plan_of`` makes one from its
parameters' records.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fx_offload import matching, placement, runtime, swap

# The plan of each offloaded model, held weakly: a model dropped without restore takes its plan.
_plans: weakref.WeakKeyDictionary[nn.Module, OffloadPlan] = weakref.WeakKeyDictionary()
# Records placed by the backend option ``offload`` -> (patterns, selected module names): for
# ``plan_of`` of a model that only the backend offloaded. Held weakly, like the records' params.
_by_backend: weakref.WeakKeyDictionary[placement.HostParameter, tuple] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModuleRow:
    name: str
    parameters: int
    nbytes: int
    policy: str = "stream"


@dataclass(frozen=True)
class OffloadPlan:
    """What ``offload`` did: the matched modules, their bytes, policies, and where they live."""

    patterns: tuple[str, ...]
    device: torch.device
    modules: tuple[ModuleRow, ...]
    records: tuple[placement.HostParameter, ...]
    resident_bytes: int
    policies: tuple[str, ...] = ()
    components: tuple[swap.Component, ...] = ()
    device_budget: int | None = None
    kept: tuple[str, ...] = ()  # 1-D parameters of streamed modules left on the device (keep_vectors)
    kept_bytes: int = 0
    keep_vectors: float = 0.05

    def outside_graphs(self) -> list[str]:
        """Offloaded parameters that no compiled graph has copied in yet.

        Ask after a compiled forward: these are read by code that Dynamo left to Python (a
        frame it skipped, such as a graph break inside a loop), which reads them in place over
        the bus, kernel by kernel, or not read at all. Keep their modules resident.
        """
        return [record.names[0] for record in self.records if not record.fetched]

    @property
    def offloaded_bytes(self) -> int:
        return sum(record.nbytes for record in self.records)

    def __str__(self) -> str:
        pinned = all(record.pinned for record in self.records)
        where = "pinned host memory" if pinned else "host memory"
        if self.device.type == "cpu":
            where = "host memory (device is cpu)"
        rows = [
            (row.name or "<root>", row.policy, str(row.parameters), _size(row.nbytes), where)
            for row in self.modules
        ]
        rows.append(("total offloaded", "", str(len(self.records)), _size(self.offloaded_bytes), where))
        rows.append(("resident", "", "", _size(self.resident_bytes), str(self.device)))
        header = ("module", "policy", "parameters", "bytes", "lives in")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 2, lines[1])
        if self.kept:
            lines.append(
                f"kept on {self.device}: {len(self.kept)} 1-D parameters of the streamed modules "
                f"(norm weights, biases; {_size(self.kept_bytes)}, counted as resident; keep_vectors)"
            )
        if self.components:
            lines.append(
                f"swapped components share {_size(self.device_budget or 0)} of {self.device} "
                f"(device_budget); each is copied in when a compiled call needs it"
            )
        return "\n".join(lines)


def offload(
    model: nn.Module,
    patterns: object,
    *,
    device: str | torch.device | None = None,
    pin_memory: bool | None = None,
    policy: str | None = None,
    device_budget: int | None = None,
    keep_vectors: float = 0.05,
) -> OffloadPlan:
    """Place the parameters of the modules that ``patterns`` select in host memory.

    Args:
        model: the model; changed in place, parameters keep their identity.
        patterns: module names, globs or ``re:`` regexes (see ``fx_offload.matching``), or a
            mapping from pattern to policy, e.g. ``{"visual": "stream", "talker": "swap"}``.
            Where patterns nest, the most specific one decides a parameter's policy.
        device: where the model computes; ``None`` is the device of the unmatched parameters,
            or ``cuda`` when they are on the CPU and a GPU exists.
        pin_memory: pin the host copies; ``None`` pins when ``device`` is an accelerator.
        policy: for a list of patterns: ``"stream"`` (default; fetched for each region of each
            call, released after it) or ``"swap"`` (each matched module is a component, copied
            whole onto the device when a compiled call needs it and kept there until another
            component needs its bytes).
        device_budget: bytes of device memory the swapped components share; default: the
            largest component's, so one is on the device at a time.
        keep_vectors: a streamed module's 1-D parameters (norm weights, biases) stay on the
            device when together they take at most this fraction of its bytes (real models':
            under 0.1%). Streamed, each would be a copy of a few KB, and a norm that a graph
            break leaves alone a graph call of its own with a copy to wait for. ``0`` streams
            them too. Swapped modules move whole.
    Returns:
        The plan; ``print(plan)`` shows a table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if pin_memory is not None and not isinstance(pin_memory, bool):
        raise TypeError(
            f"pin_memory must be True, False or None (pin where the device needs it), got {pin_memory!r}"
        )
    if isinstance(patterns, Iterator):
        patterns = list(patterns)  # read once, checked twice below
    policies = matching.normalize_policies(patterns, policy)
    patterns = matching.normalize_patterns(patterns)
    _check_budget(device_budget, policies)
    keep_vectors = _fraction(keep_vectors)
    modules = dict(model.named_modules(remove_duplicate=False))
    selected = matching.select(patterns, modules)
    chosen: dict[str, str] = {}
    for pattern, chosen_policy in zip(patterns, policies):
        for name in selected[pattern]:
            if chosen.setdefault(name, chosen_policy) != chosen_policy:
                raise ValueError(
                    f"module {name!r} is selected with policy {chosen[name]!r} and with policy "
                    f"{chosen_policy!r} (pattern {pattern!r}); give it one policy"
                )
    roots = _outermost(set(chosen))

    owned: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.numel() and matching.is_within(name.rpartition(".")[0], roots):
            owned.setdefault(id(param), (param, []))[1].append(name)
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in owned and name not in owned[id(param)][1]:
            owned[id(param)][1].append(name)  # a tied parameter's other names
    if not owned:
        raise ValueError(
            f"patterns {list(patterns)} select modules {sorted(roots)} that hold no parameters; "
            "name the modules whose weights should live in host memory"
        )
    # each parameter: (its policy, the module that heads its run of that policy)
    deciding = {key: _decide(names[0].rpartition(".")[0], chosen) for key, (_, names) in owned.items()}
    kept = _kept_vectors(owned, deciding, keep_vectors)
    for key in kept:
        del owned[key], deciding[key]
    resolved = _resolve_device(model, device, owned)
    budget = _budget(device_budget, deciding, owned)

    existing = _plans.get(model)
    if existing is not None:
        same = (existing.patterns, existing.policies, existing.device, existing.keep_vectors)
        if same == (patterns, policies, resolved, keep_vectors) and (
            device_budget is None or existing.device_budget == budget
        ):
            return existing
        raise ValueError(
            f"model is already offloaded with patterns {list(existing.patterns)} on "
            f"{existing.device} (keep_vectors={existing.keep_vectors}); call fx_offload.restore(model) "
            "before offloading it again"
        )

    keys = list(owned)
    records = placement.place([(owned[k][0], tuple(owned[k][1])) for k in keys], resolved, pin_memory)
    components: dict[str, swap.Component] = {}
    for key, record in zip(keys, records):
        policy_of, head = deciding[key]
        if policy_of == "swap":
            component = components.setdefault(head, swap.Component(head, []))
            component.records.append(record)
            placement.set_component(record, component)
    ordered = [components[name] for name in modules if name in components]
    if ordered:
        for component in ordered:
            component.nbytes = swap.layout([record.nbytes for record in component.records])[1]
        try:
            swap.Arena(ordered, budget, resolved)
        except BaseException:
            for record in records:
                placement.unplace(record)
            raise
    try:
        _move_resident(model, resolved, owned)  # last: undone whole if it fails
    except BaseException:
        if ordered:
            ordered[0].arena.release()
        for record in records:
            placement.unplace(record)
        raise
    streamed = {name for name, chosen_policy in chosen.items() if chosen_policy == "stream"}
    for name, module in modules.items():
        if matching.is_within(name, streamed):
            placement.mark_region_module(module)

    rows = []
    for head in sorted({head for _, head in deciding.values()}, key=list(modules).index):
        params = {k: owned[k][0] for k, (_, h) in deciding.items() if h == head}
        nbytes = sum(map(_nbytes, params.values()))
        rows.append(ModuleRow(head, len(params), nbytes, chosen[head]))
    resident = sum(_nbytes(p) for p in model.parameters() if id(p) not in owned)
    plan = OffloadPlan(
        patterns,
        resolved,
        tuple(rows),
        tuple(records),
        resident,
        policies,
        tuple(ordered),
        budget if ordered else None,
        tuple(names[0] for _, names in kept.values()),
        sum(_nbytes(param) for param, _ in kept.values()),
        keep_vectors,
    )
    for param, _ in kept.values():
        placement.keep(param)
    _plans[model] = plan
    return plan


def _kept_vectors(owned: dict, deciding: dict, fraction: float) -> dict[int, tuple[nn.Parameter, list[str]]]:
    """The 1-D parameters that stay on the device (``keep_vectors``): per streamed module, its
    1-D parameters if they take at most ``fraction`` of its bytes and are not all it has."""
    kept = {}
    for keys in _by_module(deciding, "stream").values():
        vectors = [key for key in keys if owned[key][0].dim() == 1]
        small, total = (sum(_nbytes(owned[key][0]) for key in group) for group in (vectors, keys))
        if vectors and len(vectors) < len(keys) and small <= fraction * total:
            kept.update((key, owned[key]) for key in vectors)
    return kept


def _by_module(deciding: dict, policy: str) -> dict[str, list[int]]:
    """The keys of the parameters of ``policy``, by the module that heads their run (``deciding``)."""
    modules: dict[str, list[int]] = {}
    for key, (chosen_policy, head) in deciding.items():
        if chosen_policy == policy:
            modules.setdefault(head, []).append(key)
    return modules


def _nbytes(param: nn.Parameter) -> int:
    return param.numel() * param.element_size()


def _decide(module: str, chosen: dict[str, str]) -> tuple[str, str]:
    """The policy of a parameter of ``module``: the deepest selected module above it decides;
    it belongs to the outermost module of that policy's innermost run on its path."""
    path = [name for name in ["", *matching.prefixes(module)] if name in chosen]
    policy = chosen[path[-1]]
    head = path[-1]
    for name in reversed(path):
        if chosen[name] != policy:
            break
        head = name
    return policy, head


def _fraction(keep_vectors: object) -> float:
    """``keep_vectors`` as a float (any real number but a bool: a NumPy scalar, a Fraction), checked."""
    number = isinstance(keep_vectors, numbers.Real) and not isinstance(keep_vectors, bool)
    if not number or not 0 <= keep_vectors <= 1:
        raise (ValueError if number else TypeError)(
            f"keep_vectors must be a fraction of a streamed module's bytes between 0 and 1 (0.05 "
            f"keeps its norms and biases on the device when they are at most 5% of it; 0 streams "
            f"them), got {keep_vectors!r}"
        )
    return float(keep_vectors)


def _check_budget(device_budget: object, policies: tuple[str, ...]) -> None:
    if device_budget is None:
        return
    whole = isinstance(device_budget, int) and not isinstance(device_budget, bool)
    if not whole or device_budget <= 0:
        raise (ValueError if whole else TypeError)(
            f"device_budget must be a positive number of bytes (an int, e.g. 4 << 30), got {device_budget!r}"
        )
    if "swap" not in policies:
        raise ValueError(
            f"device_budget={device_budget} applies only to 'swap' patterns, and no pattern has that "
            "policy; drop device_budget or give some patterns policy 'swap'"
        )


def _budget(device_budget: int | None, deciding: dict, owned: dict) -> int:
    modules = _by_module(deciding, "swap")
    if not modules:
        return 0
    totals = {head: swap.layout([_nbytes(owned[k][0]) for k in keys])[1] for head, keys in modules.items()}
    largest = max(totals, key=totals.__getitem__)
    if device_budget is None:
        return totals[largest]
    if device_budget < totals[largest]:
        raise ValueError(
            f"device_budget={device_budget} bytes is smaller than swapped component {largest!r} "
            f"({totals[largest]} bytes): give at least {totals[largest]} bytes (the largest "
            "component), or swap finer modules"
        )
    return device_budget


def restore(model: nn.Module) -> None:
    """Put every offloaded parameter of ``model`` back in device memory, values unchanged."""
    plan = _plans.pop(model, None)
    records = {
        id(record): record
        for param in model.parameters()
        if (record := placement.lookup(param.data) or placement.replaced(param)) is not None
    }
    if plan is None and not records:
        raise ValueError(
            "model has no offloaded parameters: nothing to restore (restored already, or never "
            "offloaded: offload it with fx_offload.offload(model, patterns) or the backend option "
            "'offload'; fx_offload.plan_of(model) is None when there is nothing to restore)"
        )
    runtime.forget_heads(list(records.values()) + (list(plan.records) if plan is not None else []))
    if plan is not None and plan.components and plan.components[0].arena is not None:
        plan.components[0].arena.release()
    for record in records.values():
        placement.unplace(record)
    for param in model.parameters():
        placement.unkeep(param)
    for module in model.modules():
        placement.unmark_region_module(module)


def plan_of(model: nn.Module) -> OffloadPlan | None:
    """The plan ``offload`` made for ``model``, or, where the backend option ``offload`` placed
    its parameters at compile time, the plan of what it placed; ``None`` if nothing is offloaded."""
    found = _plans.get(model)
    if found is None and isinstance(model, nn.Module):
        found = _backend_plan(model)  # made afresh: a later graph may have placed more
    return found


def note_placed_by_backend(records: list[placement.HostParameter], patterns, roots: set[str]) -> None:
    """Remember that the backend option ``offload`` (``patterns``, which selected ``roots``)
    placed ``records``, for ``plan_of``."""
    for record in records:
        _by_backend.setdefault(record, (tuple(patterns), frozenset(roots)))


def _backend_plan(model: nn.Module) -> OffloadPlan | None:
    owned: dict[int, tuple[placement.HostParameter, list[str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        record = placement.lookup(param)
        if record is not None and record in _by_backend:
            owned.setdefault(id(record), (record, []))[1].append(name)
    if not owned:
        return None
    patterns, roots = _by_backend[next(iter(owned.values()))[0]]
    modules = [name for name, _ in model.named_modules()]
    heads: dict[str, list[placement.HostParameter]] = {}
    for record, names in owned.values():
        owner = names[0].rpartition(".")[0]
        head = next((root for root in sorted(roots, key=len) if matching.is_within(owner, {root})), owner)
        heads.setdefault(head, []).append(record)
    order = {name: i for i, name in enumerate(modules)}
    rows = tuple(
        ModuleRow(head, len(records), sum(r.nbytes for r in records))
        for head, records in sorted(heads.items(), key=lambda item: order.get(item[0], len(order)))
    )
    ids = {id(record.param()) for record, _ in owned.values()}
    resident = sum(_nbytes(p) for p in model.parameters() if id(p) not in ids)
    records = tuple(record for record, _ in owned.values())
    # the backend option streams every parameter: nothing kept
    stream = ("stream",) * len(patterns)
    return OffloadPlan(patterns, records[0].device, rows, records, resident, stream, keep_vectors=0.0)


def holds_offloaded_model_parameters(params: list[nn.Parameter]) -> bool:
    """Whether one of ``params`` belongs to a model that ``offload`` offloaded."""
    ids = {id(param) for param in params}
    return any(id(param) in ids for model in list(_plans.keys()) for param in model.parameters())


def _outermost(names: set[str]) -> set[str]:
    return {n for n in names if not matching.is_within(n, names - {n}) or n == ""}


SUPPORTED_DEVICES = ("cuda", "cpu")


def _resolve_device(model: nn.Module, device, owned) -> torch.device:
    if device is not None:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device {device!r} is not a device ({error}); use 'cuda' or 'cpu'") from None
        if resolved.type not in SUPPORTED_DEVICES:
            raise ValueError(
                f"device {str(resolved)!r} is not supported: fx_offload computes on "
                f"{' or '.join(repr(d) for d in SUPPORTED_DEVICES)}; nothing was moved"
            )
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {str(resolved)!r} asked for, but this torch sees no GPU "
                "(torch.cuda.is_available() is False); pass device='cpu' to run on the host"
            )
        if resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        return resolved
    resident = [p for p in model.parameters() if id(p) not in owned]
    if resident and resident[0].device.type != "cpu":
        return resident[0].device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _move_resident(model: nn.Module, device: torch.device, owned) -> None:
    """Move the parameters not offloaded and every buffer to ``device``; all or nothing."""
    moved: list[tuple[object, object, torch.Tensor]] = []  # (holder, key, old value)
    try:
        for param in model.parameters():
            if id(param) not in owned and param.device != device:
                old = param.data
                param.data = old.to(device)
                moved.append((param, None, old))
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    module._buffers[key] = buffer.to(device)
                    moved.append((module, key, buffer))
    except BaseException:
        for holder, key, old in reversed(moved):
            if key is None:
                holder.data = old
            else:
                holder._buffers[key] = old
        raise


def _size(nbytes: float) -> str:
    if nbytes < 1000:
        return f"{nbytes:.0f} B"
    for unit in ("KB", "MB", "GB"):
        nbytes /= 1000
        if nbytes < 1000 or unit == "GB":
            break
    return f"{nbytes:.2f} {unit}"
