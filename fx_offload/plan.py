"""The user's verbs: ``offload`` a model's matched modules, ``restore`` it, and the printable plan."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from fx_offload import matching, placement, runtime

_plans: weakref.WeakKeyDictionary[nn.Module, OffloadPlan] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModuleRow:
    name: str
    parameters: int
    nbytes: int


@dataclass(frozen=True)
class OffloadPlan:
    """What ``offload`` did: the matched modules, their bytes, and where they live."""

    patterns: tuple[str, ...]
    device: torch.device
    modules: tuple[ModuleRow, ...]
    records: tuple[placement.HostParameter, ...]
    resident_bytes: int

    @property
    def offloaded_bytes(self) -> int:
        return sum(record.nbytes for record in self.records)

    def __str__(self) -> str:
        pinned = all(record.pinned for record in self.records)
        where = "pinned host memory" if pinned else "host memory"
        if self.device.type == "cpu":
            where = "host memory (device is cpu)"
        rows = [(row.name or "<root>", str(row.parameters), _size(row.nbytes), where) for row in self.modules]
        rows.append(("total offloaded", str(len(self.records)), _size(self.offloaded_bytes), where))
        rows.append(("resident", "", _size(self.resident_bytes), str(self.device)))
        header = ("module", "parameters", "bytes", "lives in")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 2, lines[1])
        return "\n".join(lines)


def offload(
    model: nn.Module,
    patterns: object,
    *,
    device: str | torch.device | None = None,
    pin_memory: bool | None = None,
) -> OffloadPlan:
    """Place the parameters of the modules that ``patterns`` select in host memory.

    Args:
        model: the model; changed in place, parameters keep their identity.
        patterns: module names, globs or ``re:`` regexes (see ``fx_offload.matching``).
        device: where the model computes; ``None`` is the device of the unmatched parameters,
            or ``cuda`` when they are on the CPU and a GPU exists.
        pin_memory: pin the host copies; ``None`` pins when ``device`` is an accelerator.
    Returns:
        The plan; ``print(plan)`` shows a table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    patterns = matching.normalize_patterns(patterns)
    modules = dict(model.named_modules(remove_duplicate=False))
    selected = matching.select(patterns, modules)
    roots = _outermost({name for names in selected.values() for name in names})

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
    resolved = _resolve_device(model, device, owned)

    existing = _plans.get(model)
    if existing is not None:
        if existing.patterns == patterns and existing.device == resolved:
            return existing
        raise ValueError(
            f"model is already offloaded with patterns {list(existing.patterns)} on "
            f"{existing.device}; call fx_offload.restore(model) before offloading it again"
        )

    _move_resident(model, resolved, owned)
    records = placement.place(
        [(param, tuple(names)) for param, names in owned.values()], resolved, pin_memory
    )
    for name, module in modules.items():
        if matching.is_within(name, roots):
            placement.mark_region_module(module)

    offloaded_ids = set(owned)
    rows = []
    for root in sorted(roots, key=list(modules).index):
        params = {id(p): p for p in modules[root].parameters() if id(p) in offloaded_ids}
        rows.append(ModuleRow(root, len(params), sum(p.numel() * p.element_size() for p in params.values())))
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in offloaded_ids)
    plan = OffloadPlan(patterns, resolved, tuple(rows), tuple(records), resident)
    _plans[model] = plan
    return plan


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
            "model has no offloaded parameters: nothing to restore (offload it with "
            "fx_offload.offload(model, patterns) or the backend option 'offload')"
        )
    runtime.forget_heads([param.data for param in model.parameters()])
    for record in records.values():
        placement.unplace(record)
    for module in model.modules():
        placement.unmark_region_module(module)


def plan_of(model: nn.Module) -> OffloadPlan | None:
    """The plan ``offload`` made for ``model``, if any."""
    return _plans.get(model)


def _outermost(names: set[str]) -> set[str]:
    return {n for n in names if not matching.is_within(n, names - {n}) or n == ""}


def _resolve_device(model: nn.Module, device, owned) -> torch.device:
    if device is not None:
        resolved = torch.device(device)
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
    for param in model.parameters():
        if id(param) not in owned and param.device != device:
            param.data = param.data.to(device)
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)


def _size(nbytes: float) -> str:
    if nbytes < 1000:
        return f"{nbytes:.0f} B"
    for unit in ("KB", "MB", "GB"):
        nbytes /= 1000
        if nbytes < 1000 or unit == "GB":
            break
    return f"{nbytes:.2f} {unit}"
