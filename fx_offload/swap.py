"""The ``swap`` policy: whole components moved onto the device between compiled calls.

A component is one module matched by a ``swap`` pattern (minus what more specific patterns
took). All swapped components of a model share one device arena of ``device_budget`` bytes. Each
component owns a fixed byte range of it, chosen once at ``offload``: ranges that fit side by
side do not overlap, the rest wrap around to the start. So the address of every swapped weight
on the device never changes, and a CUDA graph captured while reading it stays valid: swapping
another component in only rewrites bytes, it never frees or moves memory.

Before each call of a compiled graph, the backend's wrapper calls ``ensure`` for the components
that graph reads. A component already in its range, with the values its parameters hold, costs
nothing; otherwise its host copy is copied into its range on the current stream (after the work
already queued there, which may still read the bytes it overwrites), and the components whose
ranges it overlaps are marked out. Each component crosses the bus once per switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fx_offload import placement, runtime

ALIGN = 256  # bytes: each weight starts on a boundary kernels like


@dataclass(eq=False)
class Component:
    """One swapped module: its parameters' host copies and their fixed place in the arena."""

    name: str
    records: list[placement.HostParameter]
    offset: int = 0
    nbytes: int = 0
    swap_ins: int = 0  # times copied onto the device: the bytes that crossed are swap_ins * nbytes
    arena: Arena | None = field(default=None, repr=False)
    views: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # id(record) -> view
    versions: dict[int, int] = field(default_factory=dict, repr=False)  # id(record) -> version

    def overlaps(self, other: Component) -> bool:
        return self.offset < other.offset + other.nbytes and other.offset < self.offset + self.nbytes

    def __repr__(self) -> str:
        size = f"{self.nbytes / 1e6:.1f} MB"
        return f"Component({self.name!r}, {len(self.records)} params, {size}, swap_ins={self.swap_ins})"

    @property
    def resident(self) -> bool:
        return self.arena is not None and self in self.arena.resident


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the alignment every weight in the arena starts on."""
    return -(-nbytes // ALIGN) * ALIGN


def layout(records: list[placement.HostParameter]) -> tuple[list[int], int]:
    """Byte offsets of ``records`` packed one after another, aligned, and the total."""
    offsets, total = [], 0
    for record in records:
        offsets.append(total)
        total += aligned(record.nbytes)
    return offsets, total


class Arena:
    """``budget`` bytes of device memory shared by a model's swapped components."""

    def __init__(self, components: list[Component], budget: int, device: torch.device) -> None:
        self.components = components
        self.budget = budget
        self.device = device
        self.resident: set[Component] = set()
        self.swaps = 0  # components copied in, and releases: a call's wrapper checks it moved
        # ordinary tensors even when offload() runs under torch.inference_mode(): the calls
        # after it copy into them in place, which an inference tensor refuses outside that mode
        with torch.inference_mode(False):
            self.memory = torch.empty(budget, dtype=torch.uint8, device=device)
            cursor = 0
            for component in components:
                if cursor + component.nbytes > budget:
                    cursor = 0  # wrap: this one shares bytes with the first ones
                component.offset, component.arena = cursor, self
                cursor += component.nbytes
                offsets, _ = layout(component.records)
                for record, offset in zip(component.records, offsets):
                    view = _view(self.memory, component.offset + offset, record.host)
                    component.views[id(record)] = view

    def ensure(self, component: Component, reads: list[placement.HostParameter] = ()) -> None:
        """Make ``component``'s range hold its values before a call that ``reads`` those records.

        Not on the device: copy it whole, and mark out the components it overlaps. On the device:
        copy again only the records in ``reads`` written in place since (their version moved), so
        a call costs a look at the parameters it reads, not at the whole component.
        """
        if component not in self.resident:
            for other in list(self.resident):
                if other is not component and other.overlaps(component):
                    self.resident.discard(other)
            self._copy(component, component.records)
            component.swap_ins += 1
            self.swaps += 1
            self.resident.add(component)
            return
        stale = [r for r in reads if component.versions.get(id(r)) != _version(r)]
        if stale:
            self._copy(component, stale)

    @staticmethod
    def _copy(component: Component, records: list[placement.HostParameter]) -> None:
        for record in records:
            component.views[id(record)].copy_(record.host, non_blocking=True)
            component.versions[id(record)] = _version(record)
        device = runtime.device_runtime(component.arena.device)
        device.copied_bytes += sum(record.nbytes for record in records)

    def release(self) -> None:
        """Forget every component (on restore); the memory goes when the last reference does."""
        self.resident.clear()
        self.swaps += 1
        for component in self.components:
            component.views.clear()
            component.arena = None


def check_together(components: list[Component]) -> None:
    """Refuse one compiled graph that needs components sharing arena bytes at once."""
    for i, first in enumerate(components):
        for second in components[i + 1 :]:
            if first.arena is second.arena and first.overlaps(second):
                total = first.nbytes + second.nbytes
                raise ValueError(
                    f"one compiled graph reads swapped components {first.name!r} and "
                    f"{second.name!r}, which share device memory under device_budget="
                    f"{first.arena.budget}: raise device_budget to at least {total} bytes, or run "
                    "them in separate compiled calls (compile each stage on its own)"
                )


def _version(record: placement.HostParameter) -> int:
    param = record.param()
    return param._version if param is not None else -1


def _view(memory: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``like`` over ``memory[offset:]``, with a storage of its own.

    Its own storage, because a custom op's outputs may not share one; it does not own the
    memory, which the arena keeps alive.
    """
    nbytes = like.numel() * like.element_size()
    storage = torch._C._construct_storage_from_data_pointer(memory.data_ptr() + offset, memory.device, nbytes)
    view = torch.empty(0, dtype=like.dtype, device=memory.device)
    strides = torch.empty(like.shape, device="meta").stride()
    return view.set_(storage, 0, like.shape, strides)
