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

The next few regions (``prefetch_head``) are served by ``ahead``: persistent buffers whose copies
``running`` starts before every call, so the bus is busy while the CPU is still launching the
call (0.1 to 0.5 ms for a CUDA graph); the graph's ``wait`` joins them through external events,
which a captured graph waits on again at every replay. The backend makes both kinds when it
compiles (made at the first run, they would land in a CUDA graph tree's pool, which refuses them).

Every other stream fork and join of one forward happens inside that forward, so a captured CUDA
graph contains both ends of each copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

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
    if done is None and any(h.buffer.data_ptr() == fetched[0].data_ptr() for h in _heads.values()):
        return  # a head region's buffers: ready when the call started, nothing in flight
    if done is None and any(a.buffers[0].data_ptr() == fetched[0].data_ptr() for a in _aheads.values()):
        return  # an ahead region copied by ``ahead`` itself, on this stream
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


@dataclass(eq=False)
class _HeadBuffer:
    """A persistent device copy of one head weight, and the version of the values it holds."""

    buffer: torch.Tensor
    record: placement.HostParameter
    version: int


# data_ptr of a head weight -> its persistent copy
_heads: dict[int, _HeadBuffer] = {}
# compiled-graph key -> data_ptrs of the head weights that graph reads (learned at its first run)
_graph_heads: dict[object, set[int]] = {}
_running: list[object] = []


@dataclass(eq=False)
class _Ahead:
    """Persistent device copies of one region's weights, refilled before every call of a graph."""

    buffers: list[torch.Tensor]
    records: list[placement.HostParameter]
    # external: a captured graph's wait on it waits, at each replay, for the copy issued before it
    done: torch.cuda.Event | None
    started: bool = False  # copies issued for the call about to run, not yet served


# data_ptrs of a region's weights -> that region's persistent copies
_aheads: dict[tuple[int, ...], _Ahead] = {}
# compiled-graph key -> the ahead regions it reads (declared at compile time, learned at run time)
_graph_aheads: dict[object, list[_Ahead]] = {}


@contextlib.contextmanager
def running(graph_key: object) -> Iterator[None]:
    """Around one call of a compiled graph: refresh its head copies and start its ahead copies
    before it, note its refills after.

    Runs in Python on every call, CUDA-graph replays included, outside the captured graph.
    """
    for pointer in _graph_heads.get(graph_key, ()):
        head = _heads.get(pointer)
        param = head.record.param() if head is not None else None
        if param is not None and param._version != head.version:
            # written in place since the last refill (load_state_dict, mul_ under no_grad)
            head.buffer.copy_(head.record.host, non_blocking=True)
            head.version = param._version
    for region in _graph_aheads.get(graph_key, ()):
        _start_ahead(region)
    _running.append(graph_key)
    try:
        yield
    finally:
        _running.pop()
    for pointer in _graph_heads.get(graph_key, ()):
        head = _heads.get(pointer)
        param = head.record.param() if head is not None else None
        if param is not None:
            head.version = param._version  # this call's refill copied the values as they are now


def head(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The persistent copies of ``weights``, made (synchronously) at their first use."""
    if _running:
        _graph_heads.setdefault(_running[-1], set()).update(w.data_ptr() for w in weights)
    buffers = []
    for weight in weights:
        found = _heads.get(weight.data_ptr())
        if found is None or placement.lookup(weight) is not found.record:
            found = _heads[weight.data_ptr()] = _new_head(weight)
        buffers.append(found.buffer)
    return buffers


def refill(buffers: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    """Start copying ``weights`` into their head ``buffers`` for the next call."""
    _start_copies(buffers, weights)


def ahead(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The persistent copies of one ahead region's ``weights``, whose copies the wrapper started.

    Made at their first use (the backend calls this at compile time), and then filled here,
    on the current stream. A call whose wrapper did not start them copies them here too.
    """
    key = tuple(w.data_ptr() for w in weights)
    region = _aheads.get(key)
    if region is None or any(placement.lookup(w) is not r for w, r in zip(weights, region.records)):
        region = _aheads[key] = _new_ahead(weights)
    if _running:
        known = _graph_aheads.setdefault(_running[-1], [])
        if region not in known:
            known.append(region)
    if not region.started:
        if region.done is not None and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "fx_offload.ahead: a captured graph reads an ahead region whose copies were not "
                "started before the call; call the model through the compiled function "
                "torch.compile(..., backend='offload_inductor') returns"
            )
        for buffer, record in zip(region.buffers, region.records):
            buffer.copy_(record.host, non_blocking=True)
        _count(region.records)
    region.started = False
    return region.buffers


def declare_aheads(graph_key: object, weights: list[list[torch.Tensor]]) -> None:
    """At compile time: make the ahead regions of one graph and let its wrapper fill them."""
    _graph_aheads[graph_key] = [_aheads_region(w) for w in weights]


def _aheads_region(weights: list[torch.Tensor]) -> _Ahead:
    ahead(weights)  # makes (and fills) it outside any graph
    return _aheads[tuple(w.data_ptr() for w in weights)]


def _new_ahead(weights: list[torch.Tensor]) -> _Ahead:
    records = []
    for weight in weights:
        record = placement.lookup(weight)
        if record is None:
            _host_of(weight)  # raises the error that names the cause
        records.append(record)
    if weights and weights[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fx_offload.ahead met a new region while a CUDA graph is being captured; run the "
            "compiled model once without capture first (torch.compile's reduce-overhead does)"
        )
    buffers = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    done = torch.cuda.Event(external=True) if buffers and buffers[0].device.type == "cuda" else None
    return _Ahead(buffers, records, done)


def _start_ahead(region: _Ahead) -> None:
    """Before a call: copy one ahead region's host values in, on the copy stream when on a GPU."""
    _count(region.records)
    region.started = True
    if region.done is None:
        for buffer, record in zip(region.buffers, region.records):
            buffer.copy_(record.host)
        return
    device = region.buffers[0].device
    copy = _copy_stream(device)
    copy.wait_stream(torch.cuda.current_stream(device))  # earlier calls may still read them
    with torch.cuda.stream(copy):
        for buffer, record in zip(region.buffers, region.records):
            buffer.copy_(record.host, non_blocking=True)
        region.done.record(copy)
    _inflight[region.buffers[0].data_ptr()] = region.done
    _ahead_issued[device] = region.done


def _count(records: list[placement.HostParameter]) -> None:
    global copied_bytes
    for record in records:
        record.fetched = True
        copied_bytes += record.host.numel() * record.host.element_size()


def forget_heads(tensors: list[torch.Tensor]) -> None:
    """Free the head and ahead copies of ``tensors`` (on restore)."""
    pointers = {tensor.data_ptr() for tensor in tensors}
    for pointer in pointers:
        _heads.pop(pointer, None)
    for key in [key for key in _aheads if pointers.intersection(key)]:
        region = _aheads.pop(key)
        for known in _graph_aheads.values():
            if region in known:
                known.remove(region)


def _new_head(weight: torch.Tensor) -> _HeadBuffer:
    record = placement.lookup(weight)
    if record is None:
        _host_of(weight)  # raises the error that names the cause
    param = record.param()
    version = param._version if param is not None else 0
    if weight.device.type != "cuda":
        return _HeadBuffer(record.host.clone(), record, version)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fx_offload.head met a new weight while a CUDA graph is being captured; run the "
            "compiled model once without capture first (torch.compile's reduce-overhead does)"
        )
    buffer = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    buffer.copy_(record.host, non_blocking=True)
    return _HeadBuffer(buffer, record, version)


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
