"""What fetch, wait and release do on a device: the copy stream, its events, fresh buffers.

``fetch`` allocates device buffers on the compute stream (so their addresses come from the
caching allocator, or from the CUDA graph's private pool while one is captured), makes the copy
stream wait for the compute stream (the buffers may reuse memory that queued kernels still read),
and copies the pinned host tensors on the copy stream. ``wait`` makes the compute stream wait for
those copies. ``release`` ends the buffers' life; with ``poison_released`` it overwrites them, so
a reader scheduled after its release reads NaN instead of passing by luck.

A graph's first region (its first ``prefetch_head`` regions) is served by ``head``: persistent
buffers refilled for the next call, so that copy runs between calls and into the CPU time before
the next replay instead of stalling the start of the next call. Under fx_offload's wrapper
(``running``, entered around every call, outside any CUDA graph) the graph's ``refill`` only
notes that the wrapper will copy; the wrapper issues the copies when the call returns, on the
copy stream after everything the call queued on its stream, and the next call's graph waits for
them (an external event) before it reads the head. So a call ends when its outputs are ready, not
when the next call's head has landed. (Letting the whole refill start inside the call, after the
last fetch, made a call end only when the refill did: measured on an H100, RESULTS.md, sixth
session.) But the refill's first ``in_graph`` bytes (the option ``refill_in_graph``; by default
as many as the compute after the last fetch hides, ``estimate``) are copied by the graph itself,
after its last fetch, during its last compute; the graph's closing ``wait`` joins them. (Left
after the call, they would delay the next call's start where calls come back to back: RESULTS.md,
eighth session.) A graph once called with other weights (Dynamo reuses it for several blocks)
copies none in the call: its next call passes other weights, which the wrapper copies after the
call. Without the wrapper (vLLM) ``refill`` copies everything inside the graph and a ``wait`` at
its end joins it. ``running`` also fills the head again before
a call whenever the call passes other weights or a weight's version counter moved since the
last refill. A write through ``.data`` bypasses that counter: see the README's guarantees.

The backend makes the head buffers when it compiles: made at the first run, they would land in
a CUDA graph tree's pool, which refuses them. A graph Dynamo reuses for several blocks keeps one
set of head buffers per head region (``_Head``).

Every stream fork of one forward is joined inside that forward, so a captured CUDA graph contains
both ends of each copy; the head's refill crosses calls only through one external event.
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
# data_ptr of a fetched buffer -> the event its copies end with (None: a head buffer whose refill
# the wrapper issues after the call, so the graph's closing wait has nothing to join)
_inflight: dict[int, torch.cuda.Event | None] = {}


def fetch(weights: list[torch.Tensor], region: str = "") -> list[torch.Tensor]:
    """Start copying the host values of ``weights`` into fresh device buffers."""
    try:
        buffers = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    except torch.OutOfMemoryError as error:
        nbytes = sum(w.nbytes for w in weights)
        raise torch.OutOfMemoryError(
            f"fx_offload could not fetch region {region!r}: {nbytes / 1e6:.1f} MB of weights did not "
            f"fit on {weights[0].device}. With options['prefetch'] = N, up to N + 1 regions are on "
            "the device at once, each graph's prefetch_head first regions among them: pass a lower "
            f"prefetch (and prefetch_head), or offload finer modules. ({error})"
        ) from None
    _start_copies(buffers, weights)
    return buffers


def _start_copies(buffers: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    """Copy the host values of ``weights`` into ``buffers``: on a GPU, on the copy stream, after
    the compute stream's queued work (the buffers may reuse memory it still reads), ending with
    an event that ``wait`` joins."""
    records = [_record_of(weight) for weight in weights]
    _count(records)
    _copy_in(buffers, [record.host for record in records])


def _copy_in(buffers: list[torch.Tensor], hosts: list[torch.Tensor]) -> None:
    """``_start_copies`` from the host tensors themselves (whole or cut by ``_split``)."""
    if not buffers or buffers[0].device.type != "cuda":
        for buffer, host in zip(buffers, hosts):
            buffer.copy_(host)
        return
    device = buffers[0].device
    compute = torch.cuda.current_stream(device)
    copy = _copy_stream(device)
    copy.wait_stream(compute)
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
    key = fetched[0].data_ptr()
    if key in _inflight:
        done = _inflight.pop(key)
        if done is not None:
            torch.cuda.current_stream(fetched[0].device).wait_event(done)
        return  # None: a head whose refill the wrapper issues after the call, nothing to join
    found = _serving(fetched)
    if found is not None and found.refilled is not None:
        # the wrapper's refill after the previous call (an external event: captured as a wait
        # on whatever it last recorded when this graph replays)
        torch.cuda.current_stream(fetched[0].device).wait_event(found.refilled)
        return
    if key in _persistent:
        return  # a loose head's buffers: ready when the call started, nothing in flight
    raise RuntimeError(
        "fx_offload.wait found no copy in flight for its buffers: the graph's fetch and wait "
        "were separated (a graph edited after the offload pass?). Recompile the model"
    )


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
class _Head:
    """The persistent device buffers of one of a compiled graph's first regions (its head).

    One set per graph and head region, whatever weights a call passes: a graph that Dynamo reuses
    for every block of a stack (a graph break inside the block) keeps one set, not one per block.
    The wrapper refills it after each call for the next one (after all the call queued), and
    copies it again before a call, on the compute stream, only when the call passes other
    weights or their values changed in place.
    """

    buffers: list[torch.Tensor]
    positions: list[int]  # where the region's weights are among the graph's inputs
    region: str = ""  # its name in the graph: two head regions may read the same weights
    current: tuple[int, ...] = ()  # data_ptrs of the weights of the call running
    holds: tuple = ()  # (data_ptrs, versions) of the values in the buffers
    # on a GPU, an external event: when the wrapper's refill after the last call is done
    refilled: torch.cuda.Event | None = None
    deferred: bool = False  # the graph's refill left the copies to the wrapper
    in_graph: int = 0  # of them, the first bytes the graph copied itself (its refill's in_graph)
    # a graph reused for several blocks: the weights each call passed -> those of the call after
    # it last time, so that the refill after a call loads the block that comes next
    successor: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)
    known: dict[tuple[int, ...], list] = field(default_factory=dict)  # data_ptrs -> their records

    @property
    def records(self) -> list:
        """The records of the weights of the call running."""
        return self.known.get(self.current, [])


_graph_heads: weakref.WeakKeyDictionary[GraphKey, list[_Head]] = weakref.WeakKeyDictionary()
_persistent: set[int] = set()  # data_ptrs of the loose heads' buffers (a graph's head: _serving)
_running: list[GraphKey] = []


def declare_head(graph_key: GraphKey, example_inputs: list, positions: list[int], region: str = "") -> None:
    """At compile time: make the buffers of one head region of a graph (the next of its first
    regions), given the positions of its weights among the graph's inputs. Made at the first run
    instead, they would land in the memory pool of a CUDA graph tree that is warming up, which
    refuses them."""
    weights = [example_inputs[p] for p in positions]
    buffers = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    found = _Head(buffers, list(positions), region)
    _graph_heads.setdefault(graph_key, []).append(found)
    if buffers[0].device.type == "cuda":
        found.refilled = torch.cuda.Event(external=True)
        copy = _copy_stream(buffers[0].device)
        for buffer in buffers:  # the copy stream writes them: freed, wait for it before reuse
            buffer.record_stream(copy)


@contextlib.contextmanager
def running(graph_key: GraphKey, args: list) -> Iterator[None]:
    """Around one call of a compiled graph: make its head hold this call's weights before it,
    note what the head holds after it (the graph's refill copied them).

    Runs in Python on every call, CUDA-graph replays included, outside the captured graph.
    """
    heads = _graph_heads.get(graph_key, ())
    for found in heads:
        _fill(found, [args[p] for p in found.positions])
    _running.append(graph_key)
    try:
        yield
    finally:
        _running.pop()
    for found in heads:  # in region order: the copy stream is FIFO
        if found.deferred:
            _refill_after(found)
        else:
            found.holds = (found.current, _versions(found.records))


def _refill_after(found: _Head) -> None:
    """After a call: copy the head weights of the next call into the head buffers, on the copy
    stream after all the call queued on its stream (the head's readers among it); the next call's
    graph waits for them.

    The next call passes the same weights, unless Dynamo reuses the graph for several blocks:
    then the refill loads the block that followed this one last time (a wrong guess costs a copy
    before the call, as without a refill). Where the graph's refill copied the first bytes of
    these same weights during the call (``in_graph``), only the rest is copied here."""
    following = found.successor.get(found.current, found.current)
    records = found.known.get(following, found.records)
    found.holds = (following, _versions(records))
    copied = found.in_graph if following == found.current else 0  # by the graph, in the call
    _, pairs = _split(found.buffers, [record.host for record in records], copied)
    _count(records, sum(buffer.nbytes for buffer, _ in pairs))
    if found.refilled is None:
        for buffer, host in pairs:
            buffer.copy_(host)
        return
    device = found.buffers[0].device
    copy = _copy_stream(device)
    copy.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(copy):
        for buffer, host in pairs:
            buffer.copy_(host, non_blocking=True)
        found.refilled.record(copy)


def _fill(found: _Head, weights: list[torch.Tensor]) -> None:
    pointers = tuple(w.data_ptr() for w in weights)
    if pointers != found.current:
        if found.current:
            found.successor[found.current] = pointers
        if pointers not in found.known:
            found.known[pointers] = [_record_of(w) for w in weights]
        found.current = pointers
    state = (pointers, _versions(found.records))
    if found.holds == state:
        return  # the previous call refilled it with these values
    if found.refilled is not None:  # after the previous call's refill, which writes them too
        torch.cuda.current_stream(found.buffers[0].device).wait_event(found.refilled)
    for buffer, record in zip(found.buffers, found.records):
        buffer.copy_(record.host, non_blocking=True)  # on the compute stream, before the call
    _count(found.records)
    found.holds = state


def _versions(records: list) -> tuple[int, ...]:
    params = [record.param() for record in records]
    return tuple(param._version if param is not None else 0 for param in params)


def _count(records: list[placement.HostParameter], nbytes: int | None = None) -> None:
    """Mark ``records`` as fetched and count ``nbytes`` (default: all of theirs) as copied."""
    for record in records:
        record.fetched = True
    _add_copied(sum(record.nbytes for record in records) if nbytes is None else nbytes)


def _add_copied(nbytes: int) -> None:
    global copied_bytes
    copied_bytes += nbytes


def head(weights: list[torch.Tensor], region: str = "") -> list[torch.Tensor]:
    """The head buffers of the graph running for ``region``, which hold ``weights``' values (a
    module called twice, or a tied weight, makes two head regions of the same weights)."""
    pointers = tuple(w.data_ptr() for w in weights)
    heads = [h for h in _graph_heads.get(_running[-1], ()) if h.current == pointers] if _running else []
    for found in heads:
        if found.region == region:
            return found.buffers
    if heads:
        return heads[0].buffers
    return _loose_head(weights)


def _serving(buffers: list[torch.Tensor]) -> _Head | None:
    """The head of the graph running, if ``buffers`` are its buffers."""
    if not _running or not buffers:
        return None
    pointer = buffers[0].data_ptr()
    return next((h for h in _graph_heads.get(_running[-1], ()) if h.buffers[0].data_ptr() == pointer), None)


def refill(buffers: list[torch.Tensor], weights: list[torch.Tensor], in_graph: int = 0) -> None:
    """Refill the head ``buffers`` with ``weights`` for the next call. A graph's own head (under
    its wrapper): copy the first ``in_graph`` bytes now, on the copy stream (they overlap the
    compute after the call's last fetch, and the graph's last ``wait`` on these buffers joins
    them), and leave the rest to the wrapper, after the call. A loose head (no wrapper): copy it
    all now; the graph's last ``wait`` joins it."""
    found = _serving(buffers)
    if found is None:
        _start_copies(buffers, weights)
        return
    found.deferred = True
    if found.successor:  # a graph reused for several blocks: the next call passes other weights
        in_graph = 0  # (the wrapper refills the next block's whole head after the call)
    first = _split(buffers, [_record_of(w).host for w in weights], in_graph)[0] if in_graph else []
    found.in_graph = sum(b.nbytes for b, _ in first)
    _add_copied(found.in_graph)
    if first:
        _copy_in([b for b, _ in first], [h for _, h in first])
    elif buffers[0].device.type == "cuda":
        _inflight[buffers[0].data_ptr()] = None


def _split(buffers: list[torch.Tensor], hosts: list[torch.Tensor], nbytes: int) -> tuple[list, list]:
    """The pairs (buffer, host) cut after their first ``nbytes`` bytes, taken in order with each
    tensor flattened: the pairs of views that hold those bytes, and those that hold the rest."""
    first: list[tuple[torch.Tensor, torch.Tensor]] = []
    rest: list[tuple[torch.Tensor, torch.Tensor]] = []
    for buffer, host in zip(buffers, hosts):
        if nbytes and nbytes >= buffer.nbytes:
            first.append((buffer, host))
            nbytes -= buffer.nbytes
            continue
        flat = nbytes and buffer.is_contiguous() and host.is_contiguous()
        cut = nbytes // buffer.element_size() if flat else 0
        if cut:
            first.append((buffer.view(-1)[:cut], host.view(-1)[:cut]))
            rest.append((buffer.view(-1)[cut:], host.view(-1)[cut:]))
        else:
            rest.append((buffer, host))
        nbytes = 0
    return first, rest


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
        record = _record_of(weight)
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
    """Device bytes held between calls by head buffers (of every live compiled graph)."""
    buffers = [b for heads in _graph_heads.values() for found in heads for b in found.buffers]
    buffers += [loose.buffer for loose in _heads.values()]
    return sum(b.nbytes for b in buffers)


def forget_heads(tensors: list[torch.Tensor]) -> None:
    """Free the persistent copies that held ``tensors`` (on restore)."""
    pointers = {tensor.data_ptr() for tensor in tensors}
    for pointer in pointers:
        found = _heads.pop(pointer, None)
        if found is not None:
            _persistent.discard(found.buffer.data_ptr())
    for key, heads in list(_graph_heads.items()):
        if any(not pointers.isdisjoint(held) for found in heads for held in found.known):
            del _graph_heads[key]


def swapped(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The device copies of swapped ``weights``, in their component's range of the arena."""
    buffers = []
    for weight in weights:
        record = _record_of(weight)
        component = record.component
        if component is None:
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


def _record_of(weight: torch.Tensor) -> placement.HostParameter:
    """The record of the offloaded parameter ``weight`` is, or the error that names the cause."""
    record = placement.lookup(weight)
    if record is None:
        raise RuntimeError(
            f"fx_offload.fetch got a {tuple(weight.shape)} {weight.dtype} tensor that is not an "
            "offloaded parameter: its data was replaced after offload (model.to(), .half(), "
            "load_state_dict(assign=True), a new submodule?). Call fx_offload.restore(model), "
            "then offload and compile again"
        )
    return record


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device=device)
    return _copy_streams[device]
