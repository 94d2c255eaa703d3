"""What fetch, wait and release do on a device: the copy stream, its events, fresh buffers.

``fetch`` allocates device buffers on the compute stream (so their addresses come from the
caching allocator, or from the CUDA graph's private pool while one is captured), makes the copy
stream wait for the compute stream (the buffers may reuse memory that queued kernels still read),
and copies the pinned host tensors on the copy stream. ``wait`` makes the compute stream wait for
those copies. ``release`` ends the buffers' life; with ``poison_released`` it overwrites them, so
a reader scheduled after its release reads NaN instead of passing by luck.

The first region of a graph is served by ``head``: persistent buffers refilled by ``refill`` at
the end of the previous call, so its copy overlaps that call's tail instead of stalling the start
of this one. ``running`` (entered by the compiled function's wrapper around every call, outside
any CUDA graph) fills them again before a call whenever a weight's version counter moved since
the last refill. A write through ``.data`` bypasses that counter: see the README's guarantees.

With ``prefetch_head=n`` the next ``n - 1`` regions are served by ``ahead``: persistent buffers
whose copies ``running`` starts before every call, so the bus is busy while the CPU is still
launching the call (0.1 to 0.5 ms for a CUDA graph); the graph's ``wait`` joins them through
external events, which a captured graph waits on again at every replay. The backend makes both
kinds when it compiles (made at the first run, they would land in a CUDA graph tree's pool,
which refuses them).

Every other stream fork and join of one forward happens inside that forward, so a captured CUDA
graph contains both ends of each copy.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fx_offload import placement

#: Debug switch: fill released buffers with NaN (or the dtype's max) to expose late readers.
poison_released = False

#: Bytes copied host -> device by fetches, refills and swaps issued from Python. A CUDA graph's
#: replays run no Python: under ``reduce-overhead`` only the recorded calls are counted.
copied_bytes = 0

_copy_streams: dict[torch.device, torch.cuda.Stream] = {}
# data_ptr of a fetched buffer -> the event its copies end with
_inflight: dict[int, torch.cuda.Event] = {}
# device -> the event the last ahead copies issued before a call end with, until a fetch follows
_ahead_issued: dict[torch.device, torch.cuda.Event] = {}


def fetch(weights: list[torch.Tensor], region: str = "") -> list[torch.Tensor]:
    """Start copying the host values of ``weights`` into fresh device buffers."""
    try:
        buffers = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    except torch.OutOfMemoryError as error:
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        raise torch.OutOfMemoryError(
            f"fx_offload could not fetch region {region!r}: {nbytes / 1e6:.1f} MB of weights did not "
            f"fit on {weights[0].device}. With options['prefetch'] = N, up to N + 1 regions are on "
            "the device at once (plus each graph's first region with prefetch_head): lower prefetch, "
            f"set prefetch_head=False, or offload finer modules. ({error})"
        ) from None
    _start_copies(buffers, weights)
    return buffers


def _start_copies(buffers: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    """Copy the host values of ``weights`` into ``buffers``: on a GPU, on the copy stream, after
    the compute stream's queued work (the buffers may reuse memory it still reads), ending with
    an event that ``wait`` joins."""
    global copied_bytes
    hosts = [_host_of(weight) for weight in weights]
    copied_bytes += sum(host.numel() * host.element_size() for host in hosts)
    if not buffers or buffers[0].device.type != "cuda":
        for buffer, host in zip(buffers, hosts):
            buffer.copy_(host)
        return
    device = buffers[0].device
    compute = torch.cuda.current_stream(device)
    copy = _copy_stream(device)
    copy.wait_stream(compute)
    ahead_done = _ahead_issued.pop(device, None)
    if ahead_done is not None:  # a captured copy would not queue behind them: keep the bus FIFO
        copy.wait_event(ahead_done)
    with torch.cuda.stream(copy):
        for buffer, host in zip(buffers, hosts):
            buffer.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(copy)
    _inflight[buffers[0].data_ptr()] = done


def wait(fetched: list[torch.Tensor]) -> None:
    """Make the compute stream wait until ``fetched`` holds its values."""
    if not fetched or fetched[0].device.type != "cuda":
        return
    done = _inflight.pop(fetched[0].data_ptr(), None)
    if done is None and fetched[0].data_ptr() in _persistent:
        return  # a head region's buffers: ready when the call started, nothing in flight
    if done is None:
        raise RuntimeError(
            "fx_offload.wait found no copy in flight for its buffers: the graph's fetch and wait "
            "were separated (a graph edited after the offload pass?). Recompile the model"
        )
    torch.cuda.current_stream(fetched[0].device).wait_event(done)


def release(fetched: list[torch.Tensor]) -> torch.Tensor:
    """End the life of ``fetched``; return a token that later fetches order themselves after."""
    if poison_released:
        for buffer in fetched:
            buffer.fill_(float("nan") if buffer.is_floating_point() else torch.iinfo(buffer.dtype).max)
    device = fetched[0].device if fetched else torch.device("cpu")
    return torch.empty(0, device=device)


class GraphKey:
    """Names one compiled graph; its persistent buffers live as long as it does."""

    __slots__ = ("__weakref__",)


@dataclass(eq=False)
class _Slot:
    """Persistent device buffers for one of a compiled graph's first regions.

    One set per graph, whatever weights a call passes: a graph that Dynamo reuses for every block
    of a stack (a graph break inside the block) keeps one set, not one per block, and the wrapper
    fills it with the weights of the call about to run. The head (the first region) is refilled by
    the graph at its end for the next call; the wrapper copies it again, on the compute stream,
    only when a call passes other weights or their values changed in place. An ahead slot is
    copied by the wrapper before every call, on the copy stream, ending with ``done``: an external
    event that the graph's ``wait`` joins, and that a captured graph waits on at every replay.
    """

    buffers: list[torch.Tensor]
    positions: list[int]  # where the region's weights are among the graph's inputs
    head: bool
    done: torch.cuda.Event | None = None  # ahead slots on a GPU
    current: tuple[int, ...] = ()  # data_ptrs of the weights of the call running
    records: list = field(default_factory=list)  # their records
    holds: tuple = ()  # head: (data_ptrs, versions) of the values in its buffers
    served: set[int] = field(default_factory=set)  # data_ptrs of every weight it held


_slots: weakref.WeakKeyDictionary[GraphKey, list[_Slot]] = weakref.WeakKeyDictionary()
_persistent: set[int] = set()  # data_ptrs of the first buffer of every slot and loose head
_running: list[GraphKey] = []


def declare_slots(graph_key: GraphKey, example_inputs: list, regions: list[list[int]]) -> None:
    """At compile time: make the buffers of a graph's first regions, given the positions of their
    weights among its inputs (the first region is the head). Made at the first run instead, they
    would land in the memory pool of a CUDA graph tree that is warming up, which refuses them."""
    slots = []
    for i, positions in enumerate(regions):
        weights = [example_inputs[p] for p in positions]
        buffers = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
        done = torch.cuda.Event(external=True) if i and weights[0].device.type == "cuda" else None
        slots.append(_Slot(buffers, list(positions), head=i == 0, done=done))
        _persistent.add(buffers[0].data_ptr())
    _slots[graph_key] = slots


@contextlib.contextmanager
def running(graph_key: GraphKey, args: list) -> Iterator[None]:
    """Around one call of a compiled graph: fill its slots with this call's weights before it,
    note what its head holds after it.

    Runs in Python on every call, CUDA-graph replays included, outside the captured graph.
    """
    slots = _slots.get(graph_key, ())
    for slot in slots:
        _fill(slot, [args[p] for p in slot.positions])
    _running.append(graph_key)
    try:
        yield
    finally:
        _running.pop()
    for slot in slots:
        if slot.head:  # this call's refill copied its weights as they are now
            slot.holds = (slot.current, _versions(slot.records))


def _fill(slot: _Slot, weights: list[torch.Tensor]) -> None:
    pointers = tuple(w.data_ptr() for w in weights)
    if pointers != slot.current:
        records = [placement.lookup(w) for w in weights]
        for weight, record in zip(weights, records):
            if record is None:
                _host_of(weight)  # raises the error that names the cause
        slot.current, slot.records = pointers, records
        slot.served.update(pointers)
    records = slot.records
    if slot.head:
        state = (pointers, _versions(records))
        if slot.holds == state:
            return  # the previous call refilled it with these values
        for buffer, record in zip(slot.buffers, records):
            buffer.copy_(record.host, non_blocking=True)  # on the compute stream, before the call
        _count(records)
        slot.holds = state
        return
    _count(records)
    if slot.done is None:
        for buffer, record in zip(slot.buffers, records):
            buffer.copy_(record.host)
        return
    device = slot.buffers[0].device
    copy = _copy_stream(device)
    copy.wait_stream(torch.cuda.current_stream(device))  # earlier calls may still read them
    with torch.cuda.stream(copy):
        for buffer, record in zip(slot.buffers, records):
            buffer.copy_(record.host, non_blocking=True)
        slot.done.record(copy)
    _inflight[slot.buffers[0].data_ptr()] = slot.done
    _ahead_issued[device] = slot.done


def _versions(records: list) -> tuple[int, ...]:
    params = [record.param() for record in records]
    return tuple(param._version if param is not None else 0 for param in params)


def _count(records: list[placement.HostParameter]) -> None:
    global copied_bytes
    for record in records:
        record.fetched = True
        copied_bytes += record.host.numel() * record.host.element_size()


def _slot_of(weights: list[torch.Tensor]) -> _Slot | None:
    if not _running:
        return None
    pointers = tuple(w.data_ptr() for w in weights)
    return next((s for s in _slots.get(_running[-1], ()) if s.current == pointers), None)


def head(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The head buffers of the graph running, which hold ``weights``' values."""
    slot = _slot_of(weights)
    return slot.buffers if slot is not None else _loose_head(weights)


def ahead(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The ahead buffers of the graph running, into which its wrapper started copying ``weights``."""
    slot = _slot_of(weights)
    if slot is None:
        raise RuntimeError(
            "fx_offload.ahead: no buffers were prepared for this region before the call. Call the "
            "model through what torch.compile(..., backend='offload_inductor') returns, or pass "
            "options={'prefetch_head': 1}"
        )
    return slot.buffers


def refill(buffers: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    """Start copying ``weights`` into their head ``buffers`` for the next call."""
    _start_copies(buffers, weights)


@dataclass(eq=False)
class _HeadBuffer:
    """A head buffer of a graph run without fx_offload's wrapper (vLLM): one per weight."""

    buffer: torch.Tensor
    record: placement.HostParameter
    version: int


_heads: dict[int, _HeadBuffer] = {}  # data_ptr of a weight -> its persistent copy


def _loose_head(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Without the wrapper: one persistent copy per weight, copied again here (outside capture)
    when its version counter moved."""
    buffers = []
    capturing = weights and weights[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    for weight in weights:
        record = placement.lookup(weight)
        if record is None:
            _host_of(weight)  # raises the error that names the cause
        found = _heads.get(weight.data_ptr())
        if found is None or found.record is not record:
            if capturing:
                raise RuntimeError(
                    "fx_offload.head met a new weight while a CUDA graph is being captured; run "
                    "the compiled model once without capture first"
                )
            buffer = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            found = _heads[weight.data_ptr()] = _HeadBuffer(buffer, record, -1)
            _persistent.add(buffer.data_ptr())
        version = _versions([record])[0]
        if found.version != version and not capturing:
            found.buffer.copy_(record.host, non_blocking=True)
            _count([record])
            found.version = version
        buffers.append(found.buffer)
    return buffers


def persistent_bytes() -> int:
    """Device bytes held between calls by head and ahead buffers (every live compiled graph)."""
    buffers = [b for slots in _slots.values() for slot in slots for b in slot.buffers]
    buffers += [head.buffer for head in _heads.values()]
    return sum(b.numel() * b.element_size() for b in buffers)


def forget_heads(tensors: list[torch.Tensor]) -> None:
    """Free the persistent copies that held ``tensors`` (on restore)."""
    pointers = {tensor.data_ptr() for tensor in tensors}
    for pointer in pointers:
        found = _heads.pop(pointer, None)
        if found is not None:
            _persistent.discard(found.buffer.data_ptr())
    for key, slots in list(_slots.items()):
        if any(pointers & slot.served for slot in slots):
            for slot in slots:
                _persistent.discard(slot.buffers[0].data_ptr())
            del _slots[key]


def swapped(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The device copies of swapped ``weights``, in their component's range of the arena."""
    buffers = []
    for weight in weights:
        record = placement.lookup(weight)
        component = record.component if record is not None else None
        if component is None:
            _host_of(weight)  # raises the error that names the cause
            raise RuntimeError(
                f"fx_offload.swapped got a weight of a module that is not swapped: {record.names}"
            )
        if not component.resident:
            raise RuntimeError(
                f"swapped component {component.name!r} is not on the device: a compiled graph that "
                "reads it ran without fx_offload's wrapper (which copies it in before each call). "
                "Call the model through torch.compile(..., backend='offload_inductor')"
            )
        record.fetched = True
        buffers.append(component.views[id(record)])
    return buffers


def _host_of(weight: torch.Tensor) -> torch.Tensor:
    record = placement.lookup(weight)
    if record is None:
        raise RuntimeError(
            f"fx_offload.fetch got a {tuple(weight.shape)} {weight.dtype} tensor that is not an "
            "offloaded parameter: its data was replaced after offload (model.to(), .half(), "
            "load_state_dict(assign=True), a new submodule?). Call fx_offload.restore(model), "
            "then offload and compile again"
        )
    record.fetched = True
    return record.host


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device=device)
    return _copy_streams[device]
