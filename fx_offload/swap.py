"""The ``swap`` policy: whole components moved onto the device between compiled calls.

A component is one module matched by a ``swap`` pattern (minus what more specific patterns
took). All swapped components of a model share one device arena of ``device_budget`` bytes. Each
component owns a fixed byte range of it, chosen once at ``offload``: ranges that fit side by
side do not overlap, the rest wrap around to the start. So the address of every swapped weight
on the device never changes, and a CUDA graph captured while reading it stays valid: swapping
another component in only rewrites bytes, it never frees or moves memory.

Before each call of a compiled graph, the backend's wrapper calls ``ensure`` for the components
that graph reads. A component already in its range, with the values its parameters hold, costs
nothing; otherwise its host copy is copied into its range, and the components whose ranges it
overlaps are marked out. Each component crosses the bus once per switch.

On a CUDA device the copy lands in pieces of about ``PIECE`` bytes, in the order of the
component's parameters (a stack's blocks in order), on the copy stream, after the work already
queued on the compute stream (which may still read the bytes it overwrites), with an event after
each piece. A call then waits only for the piece that holds the last parameter it reads: the
first block's graphs run while the later blocks are still crossing. Models that Dynamo splits
into many graphs spend most of a forward on the host, and their ``.item()`` syncs wait for all
the compute stream holds; a copy queued there whole would stall the first sync for all of it.
The arena lays each component's weights out as its pinned host slab does
(``placement.packed_offsets``), so a piece is one copy per host run, not one per parameter.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from fx_offload import placement, runtime

ALIGN = 256  # bytes: each component starts on a boundary kernels like (its weights: packed_offsets)
PIECE = 32 << 20  # bytes: a swap-in's copy lands in pieces of about this many, each with an event


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
    index: dict[int, int] = field(default_factory=dict, repr=False)  # id(record) -> its position
    offsets: list[int] = field(default_factory=list, repr=False)  # per record, its bytes' start
    # the swap-in's copy, made once per placement generation: (generation, per piece (position of
    # its last record, its arena targets, per target where its host bytes start (a record's
    # position) and how many (None: that record's own host copy))); no host tensor is kept
    pieces: tuple[int, list[tuple[int, list, list]]] | None = field(default=None, repr=False)
    # a swap-in still landing: per piece not yet waited for, (its last record, its event)
    landing: list[tuple[int, torch.cuda.Event]] = field(default_factory=list, repr=False)
    landed_on: int | None = field(default=None, repr=False)  # the stream that waits for the pieces
    landed_to: int = field(default=-1, repr=False)  # the last record it waited for
    events: list[torch.cuda.Event] = field(default_factory=list, repr=False)  # one per piece, reused

    def overlaps(self, other: Component) -> bool:
        return self.offset < other.offset + other.nbytes and other.offset < self.offset + self.nbytes

    def __repr__(self) -> str:
        size = f"{self.nbytes / 1e6:.1f} MB"
        return f"Component({self.name!r}, {len(self.records)} params, {size}, swap_ins={self.swap_ins})"

    def last_of(self, reads: list[placement.HostParameter]) -> int:
        """The position of the last of ``reads`` in ``records`` (all of them without ``reads``)."""
        index = self.index
        return max(index[id(r)] for r in reads) if reads else len(self.records) - 1

    @property
    def resident(self) -> bool:
        return self.arena is not None and self in self.arena.resident


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the alignment every component in the arena starts on."""
    return -(-nbytes // ALIGN) * ALIGN


def layout(nbytes: list[int]) -> tuple[list[int], int]:
    """Byte offsets of weights of ``nbytes`` bytes in a component's range, laid out as a pinned
    slab holds them (``placement.packed_offsets``), and the range's bytes (aligned)."""
    offsets, end = placement.packed_offsets(nbytes)
    return offsets, aligned(end)


class Arena:
    """``budget`` bytes of device memory shared by a model's swapped components."""

    def __init__(self, components: list[Component], budget: int, device: torch.device) -> None:
        self.components = components
        self.budget = budget
        self.device = device
        self.resident: set[Component] = set()
        # swap-ins and releases so far, in a cell: a graph's check keeps the cell, not the arena
        # (whose memory must go with its model), and finds its components where it left them
        # while the count has not moved
        self.moves = [0]
        # ordinary tensors even when offload() runs under torch.inference_mode(): the calls
        # after it copy into them in place, which an inference tensor refuses outside that mode
        with torch.inference_mode(False):
            self.memory = torch.empty(budget, dtype=torch.uint8, device=device)
            if device.type == "cuda":  # the copy stream writes it (``_land``): freed, wait for it
                self.memory.record_stream(runtime.device_runtime(device).copy_stream())
            cursor = 0
            for component in components:
                if cursor + component.nbytes > budget:
                    cursor = 0  # wrap: this one shares bytes with the first ones
                component.offset, component.arena = cursor, self
                cursor += component.nbytes
                component.offsets, _ = layout([record.nbytes for record in component.records])
                for i, (record, offset) in enumerate(zip(component.records, component.offsets)):
                    view = _view(self.memory, component.offset + offset, record.host)
                    component.views[id(record)] = view
                    component.index[id(record)] = i

    def ensure(self, component: Component, reads: list[placement.HostParameter] = ()) -> None:
        """Make ``component``'s range hold its values before a call that ``reads`` those records.

        Not on the device: copy it whole (``_land``), and mark out the components it overlaps. On the
        device: wait for the pieces still landing that hold ``reads``, and copy again only the
        records in ``reads`` written in place since (their version moved), so a call costs a look
        at the parameters it reads, not at the whole component.
        """
        if component not in self.resident:
            for other in list(self.resident):
                if other is not component and other.overlaps(component):
                    self.resident.discard(other)
                    other.landing = []
            self._moved()
            self._land(component)
            component.swap_ins += 1
            self.resident.add(component)
        if component.landing:
            self.wait_for(component, component.last_of(reads))
        stale = [r for r in reads if component.versions.get(id(r)) != _version(r)]
        if stale:
            self._copy(component, stale)

    def _land(self, component: Component) -> None:
        """Copy all of ``component`` into its range: on a CUDA device in pieces on the copy stream
        (``landing`` holds their events), elsewhere (or while a CUDA graph is captured, which must
        join every stream it forks) on the current stream."""
        records, pieces = component.records, None
        while pieces is None:  # again where a parameter died meanwhile (a collection) and took its host
            generation = placement.generation()
            if component.pieces is None or component.pieces[0] != generation:
                component.pieces = (generation, _pieces(component, self.memory))
            pieces = [
                (last, targets, [_host(records[first], n) for first, n in parts])
                for last, targets, parts in component.pieces[1]
            ]
            if placement.generation() != generation:
                pieces = None
        _copied(component, records)
        if self.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            for _, targets, hosts in pieces:
                runtime.copy_all(targets, hosts)
            component.landing = []
            return
        events = component.events
        # external: a capture's call may wait for them (``wait_for``), recorded outside it
        events += [torch.cuda.Event(external=True) for _ in range(len(pieces) - len(events))]
        device = runtime.device_runtime(self.device)
        device.copy_each([(targets, hosts, event) for (_, targets, hosts), event in zip(pieces, events)])
        component.landing = [(last, event) for (last, _, _), event in zip(pieces, events)]
        component.landed_on, component.landed_to = None, -1

    @staticmethod
    def wait_for(component: Component, last: int) -> None:
        """Make the compute stream wait for the pieces of ``component`` still landing up to the one
        that holds its record at position ``last``; the pieces before it are then waited for too
        (one copy stream). While it lands, another stream than the one that waited first, and a
        CUDA graph capture, wait for all of it. (Once it landed, a stream is ordered after the copy
        only through the stream that waited, as for any tensor written on one stream and read on
        another.)"""
        device = runtime.device_runtime(component.arena.device)
        stream = device.compute_stream()
        landing = component.landing
        capturing = device.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if component.landed_on not in (None, stream.stream_id) or capturing:
            runtime.wait_event(landing[-1][1], stream)  # (a capture waits at its replays: noted nowhere)
            return
        if last <= component.landed_to:
            return
        found = bisect.bisect_left(landing, last, key=lambda piece: piece[0])
        runtime.wait_event(landing[found][1], stream)
        component.landing = landing[found + 1 :]
        component.landed_on, component.landed_to = stream.stream_id, landing[found][0]

    @staticmethod
    def _copy(component: Component, records: list[placement.HostParameter]) -> None:
        for record in records:
            component.views[id(record)].copy_(record.host, non_blocking=True)
        _copied(component, records)

    def _moved(self) -> None:
        """Count a component that came or went (``moves``)."""
        self.moves[0] += 1

    def release(self) -> None:
        """Forget every component (on restore); the memory goes when the last reference does."""
        self._moved()
        self.resident.clear()
        for component in self.components:
            component.views.clear()
            component.pieces = None
            component.landing = []
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


def _pieces(component: Component, memory: torch.Tensor) -> list[tuple[int, list, list]]:
    """``component``'s copy in pieces of about ``PIECE`` bytes, cut between records, of the records
    whose parameters live (a replaced module's are gone, and no graph reads them): per piece, the
    position of its last record, its arena targets, and per target, where its host bytes start
    (a record's position) and how many, None for a record's own host copy. One target per host run
    (``_runs``), or part of one."""
    records, offsets = component.records, component.offsets
    live = [i for i, record in enumerate(records) if record.param() is not None]
    pieces: list[tuple[int, list, list]] = []
    targets: list[torch.Tensor] = []
    parts: list[tuple[int, int | None]] = []
    size = 0

    def take(first: int, last: int, alone: bool) -> None:
        if alone:  # a run of one: the record's view and host copy, typed
            targets.append(component.views[id(records[first])])
            parts.append((first, None))
            return
        start = component.offset + offsets[first]
        end = component.offset + offsets[last] + records[last].nbytes
        targets.append(memory[start:end])
        parts.append((first, end - start))

    for run in _runs(records, live):
        start = 0
        for k, i in enumerate(run):
            size += records[i].nbytes
            if size >= PIECE:
                take(run[start], i, len(run) == 1)
                pieces.append((i, targets, parts))
                targets, parts, size, start = [], [], 0, k + 1
        if start < len(run):
            take(run[start], run[-1], len(run) == 1)
    if targets:
        pieces.append((len(records) - 1, targets, parts))
    elif pieces:
        pieces[-1] = (len(records) - 1, *pieces[-1][1:])  # the last piece covers any dead records after it
    return pieces


def _runs(records: list[placement.HostParameter], live: list[int]) -> list[list[int]]:
    """The positions ``live`` of ``records`` as runs that lie one after another both in a host
    allocation (``placement.runs``) and in the component's range: consecutive positions (a dead
    record between two live ones holds their places apart in the range)."""
    found: list[list[int]] = []
    for first, count, _ in placement.runs([records[i].host for i in live]) if live else ():
        run = [live[first]]
        for i in live[first + 1 : first + count]:
            if i != run[-1] + 1:
                found.append(run)
                run = []
            run.append(i)
        found.append(run)
    return found


def _copied(component: Component, records: list[placement.HostParameter]) -> None:
    """Note ``records`` as copied into ``component``'s range: their versions, their bytes."""
    for record in records:
        component.versions[id(record)] = _version(record)
    runtime.device_runtime(component.arena.device).copied_bytes += sum(record.nbytes for record in records)


def _host(record: placement.HostParameter, nbytes: int | None) -> torch.Tensor:
    """``record``'s host copy (``nbytes`` None), else ``nbytes`` bytes from where it starts."""
    return record.host if nbytes is None else placement.bytes_from(record.host, nbytes)


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
