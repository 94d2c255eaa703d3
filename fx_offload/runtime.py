"""What fetch, wait and release do on a device: the copy stream, its events, fresh buffers.

``fetch`` allocates device buffers on the compute stream (so their addresses come from the
caching allocator, or from the CUDA graph's private pool while one is captured), makes the copy
stream wait for the compute stream (the buffers may reuse memory that queued kernels still read),
and copies the pinned host tensors on the copy stream. ``wait`` makes the compute stream wait for
those copies. ``release`` ends the buffers' life; after ``poison_released_buffers(True)`` it
overwrites them, so a reader scheduled after its release reads NaN instead of passing by luck.

State lives in three kinds of objects:

* ``DeviceRuntime``, one per device, in the module's only registry (``device_runtime``): the
  copy stream, the copies in flight (buffer address -> the event they end with), the loose
  heads of graphs run without fx_offload's wrapper, and the count of bytes copied
  (``bytes_copied()``). It also knows every live ``GraphRuntime`` on the device, weakly, and owns
  the ``sequence.CallSequence`` that learns the order of their calls across graph breaks (each
  graph with heads is a token in it), so that the heads of the call expected next are copied
  after the call before it (``GraphRuntime.leave``, ``last_forward()``). The host tensors and
  arena views the ``fetch`` and ``swapped`` ops read are cached there per set of weights.
* ``GraphRuntime``, one per compiled graph: made by the backend at compile time and owned by the
  compiled function's wrapper, it lives as long as the graph. It holds the graph's heads
  (``_Head``: its first regions) and their refill state. A head's persistent buffers and what
  they hold are a ``_Store``, shared by the heads of every graph that reads the same weights first
  (generate()'s prompt and one-token graphs), so those weights take device memory once. A graph
  that several threads call keeps one set of heads per calling thread, with stores of their own,
  so that two models that share a graph (Dynamo reuses one for two instances of a class) never
  read each other's weights; in one thread a set serves every model and block the graph runs.
* the call stack of each thread (``GraphRuntime.enter`` / ``leave``): which graph's heads the
  ``head``, ``refill`` and ``wait`` ops of the call in progress serve (a graph whose heads are
  passed as inputs has no such op and is not put on it).

Parameters are known through their records (``placement.HostParameter``), which these objects
hold weakly: a model dropped without ``restore`` leaves nothing behind but the graph's buffers,
whose values no later model is served (what a store holds names ``placement.generation()``).

A graph's first region (its first ``prefetch_head`` regions) is served by ``head``: persistent
buffers refilled for the next call, so that copy runs between calls and into the CPU time before
the next replay instead of stalling the start of the next call. Under fx_offload's wrapper
(``GraphRuntime.enter`` and ``leave``, around every call, outside any CUDA graph) the graph's
``refill`` only notes that the wrapper will copy; the wrapper issues the copies when the call
returns, on the copy stream after everything the call queued on its stream, and the next call's
graph waits for them (an external event) before it reads the head. So a call ends when its
outputs are ready, not when the next call's head has landed. Nothing is copied where the head
already holds the next call's weights, unchanged (a graph called again with the same weights); a
small head passed as an input (``INLINE_BYTES``) is refilled on the compute stream, in line. But
the refill's first ``in_graph`` bytes (the option ``refill_in_graph``; by default as many as the
compute after the last fetch hides, ``estimate``) are copied by the graph itself, after its last
fetch, during its last compute; the graph's closing ``wait`` joins them (left after the call,
they would delay the next call's start where calls come back to back). A graph once called with
other weights (Dynamo reuses it for several blocks) copies none in the call: its next call
passes other weights, which the wrapper copies after the call. Without the wrapper (vLLM)
``refill`` copies everything inside the graph and a ``wait`` at its end joins it. ``enter`` also
fills the head again before a call whenever the call passes other weights or a weight's version
counter moved since the last refill. A write through ``.data`` bypasses that counter: see the
README's guarantees.

The backend makes the head buffers when it compiles: made at the first run, they would land in
a CUDA graph tree's pool, which refuses them. A graph Dynamo reuses for several blocks keeps one
set of head buffers per head region and thread, not one per block.

Every stream fork of one forward is joined inside that forward, so a captured CUDA graph contains
both ends of each copy; the head's refill crosses calls only through one external event.
"""

from __future__ import annotations

import math
import operator
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch._dynamo.utils import counters

from fx_offload import placement
from fx_offload.regions import common_module
from fx_offload.sequence import CallSequence, Forward, Origin


@dataclass(eq=False)
class _LooseHead:
    """A head buffer of a graph run without fx_offload's wrapper (vLLM): one per weight."""

    buffer: torch.Tensor
    record: weakref.ref  # to the weight's placement.HostParameter
    version: int


@dataclass(eq=False)
class DeviceRuntime:
    """One device's copy stream, copies in flight, loose heads and counters."""

    device: torch.device
    #: Bytes copied host -> device by fetches, refills and swaps issued from Python. A CUDA
    #: graph's replays run no Python: under ``reduce-overhead`` only the recorded calls count.
    copied_bytes: int = 0
    # data_ptr of a fetched buffer -> the event its copies end with (None: a head buffer whose
    # refill the wrapper issues after the call, so the graph's closing wait has nothing to join)
    inflight: dict[int, torch.cuda.Event | None] = field(default_factory=dict)
    loose_heads: dict[int, _LooseHead] = field(default_factory=dict)  # weight data_ptr -> copy
    persistent: set[int] = field(default_factory=set)  # data_ptrs of the loose heads' buffers
    graphs: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # live GraphRuntimes
    #: the order of the calls of graphs with heads, learned across forwards (the next call's guess)
    sequence: CallSequence = field(default_factory=CallSequence)
    # sequence token -> the GraphRuntime it names
    by_token: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)
    # a fetch's weights (their data_ptrs) -> (placement generation, records, bytes)
    hosts: dict[tuple[int, ...], tuple] = field(default_factory=dict)
    # (a head's weights as (data_ptr, shape, dtype)s, which of the graph's heads of them) -> the
    # buffers that the graphs serving them first share
    stores: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)
    # a swapped op's weights (their data_ptrs) -> (generation, weak components, arena views)
    views: dict[tuple[int, ...], tuple] = field(default_factory=dict)
    # a tuple of the data_ptrs of a call's head weights -> itself, the first tuple made of them:
    # every later call passes that one object on (``GraphRuntime.enter``), so the tables keyed by
    # them (a head's successors and versions, a store's copies, the call sequence) find it by
    # identity instead of comparing the tuples address by address, each a Python int
    interned: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)
    _stream: torch.cuda.Stream | None = None
    # raw stream id -> its Stream object (``torch.cuda.current_stream`` builds a new one per call)
    _streams: dict[int, torch.cuda.Stream] = field(default_factory=dict)
    _events: list[torch.cuda.Event] = field(default_factory=list)  # recorded and waited for: free

    def copy_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    def compute_stream(self) -> torch.cuda.Stream:
        """The calling thread's current stream on the device: the stream the graph computes on."""
        ids = torch._C._cuda_getCurrentStream(self.device.index)
        found = self._streams.get(ids[0])
        if found is None:
            if len(self._streams) > _CACHED:
                self._streams.clear()
            found = self._streams[ids[0]] = torch.cuda.Stream(
                stream_id=ids[0], device_index=ids[1], device_type=ids[2]
            )
        return found

    def event(self) -> torch.cuda.Event:
        """An event to record (a free one, or a new one)."""
        return self._events.pop() if self._events else torch.cuda.Event()

    def join(self, event: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
        """Make ``stream`` wait for ``event``'s last record; the event is then free to record
        again, unless a CUDA graph is being captured (the capture keeps what it recorded)."""
        _WAIT(event, stream)
        if not torch._C._cuda_isCurrentStreamCapturing() and len(self._events) < _FREE_EVENTS:
            self._events.append(event)

    def copy(self, buffers, hosts, done: torch.cuda.Event | None = None) -> torch.cuda.Event:
        """Copy each host tensor of ``hosts`` into its device buffer on the copy stream, after all the
        compute stream queued (the buffers may reuse memory its kernels still read); record
        ``done`` (or a free event) on the copy stream after them and return it."""
        done = done if done is not None else self.event()
        self.copy_each(((buffers, hosts, done),))
        return done

    def copy_each(self, pieces) -> None:
        """``copy`` of several pieces in order, each ``(buffers, hosts, done)``: one wait for the
        compute stream, then per piece its copies and ``done``'s record.

        This runs after every graph call with heads, so it makes its calls itself, not through
        helpers (a Python frame is about a microsecond on a busy host): the copy stream is made
        current directly, not through ``torch.cuda.stream``, whose enter and exit read and build
        the current stream twice; a one-tensor copy is ``copy_all``'s case in line. On another
        device than the current one it runs with that device made current."""
        if torch._C._cuda_getDevice() != self.device.index:
            with torch.cuda.device(self.device):
                self.copy_each(pieces)
            return
        compute = self.compute_stream()
        copy = self._stream if self._stream is not None else self.copy_stream()
        ready = self._events.pop() if self._events else torch.cuda.Event()
        _RECORD(ready, compute)
        _WAIT(ready, copy)  # (``join``, in line)
        if not torch._C._cuda_isCurrentStreamCapturing() and len(self._events) < _FREE_EVENTS:
            self._events.append(ready)
        _SET_STREAM(stream_id=copy.stream_id, device_index=copy.device_index, device_type=copy.device_type)
        try:
            for buffers, hosts, done in pieces:
                if len(buffers) == 1:
                    buffers[0].copy_(hosts[0], non_blocking=True)
                else:
                    copy_all(buffers, hosts)
                _RECORD(done, copy)
        finally:
            _SET_STREAM(
                stream_id=compute.stream_id,
                device_index=compute.device_index,
                device_type=compute.device_type,
            )

    def count(self, records: list[placement.HostParameter], nbytes: int | None = None) -> None:
        """Mark ``records`` as fetched and count ``nbytes`` (default: all of theirs) as copied."""
        for record in records:
            record.fetched = True
        self.copied_bytes += sum(record.nbytes for record in records) if nbytes is None else nbytes


def wait_event(event: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
    """Make ``stream`` wait for ``event``'s last record (the event stays its owner's)."""
    _WAIT(event, stream)


def copy_all(buffers, hosts) -> None:
    """Copy each of ``hosts`` into its buffer, on the current stream: one ``copy_`` per tensor for
    one or two (a packed head's runs), else one ``_foreach_copy_`` (this runs on every graph call
    with heads; on the H200, torch 2.11, a host-to-device ``copy_`` took 3.7 us to issue,
    ``_foreach_copy_`` 5.2 us for one tensor and 7.9 for two)."""
    buffers = list(buffers)
    if len(buffers) > 2:
        torch._foreach_copy_(buffers, list(hosts), non_blocking=True)
        return
    for buffer, host in zip(buffers, hosts):
        buffer.copy_(host, non_blocking=True)


class _Registry:
    """The per-device runtimes, and each thread's stack of graph calls in progress."""

    def __init__(self) -> None:
        self.devices: dict[torch.device, DeviceRuntime] = {}
        self.local = threading.local()
        self.poison_released = False  # see ``poison_released_buffers``
        self.lock = threading.RLock()  # the graphs' slow paths: a thread new to a graph, remakes, drops

    def stack(self) -> list[list[_Head]]:
        stack = getattr(self.local, "stack", None)
        if stack is None:
            stack = self.local.stack = []
        return stack


_registry = _Registry()


def poison_released_buffers(enabled: bool) -> None:
    """Debug switch: fill released buffers with NaN (or the dtype's max), so that a reader
    scheduled after its release reads garbage instead of passing by luck (the tests turn it on)."""
    _registry.poison_released = bool(enabled)


def device_runtime(device: torch.device) -> DeviceRuntime:
    """The runtime of ``device`` (made at first use)."""
    found = _registry.devices.get(device)
    if found is None:
        found = _registry.devices[device] = DeviceRuntime(device)
    return found


def bytes_copied() -> int:
    """Bytes copied host -> device so far, on every device (also readable as ``copied_bytes``)."""
    return sum(found.copied_bytes for found in list(_registry.devices.values()))


def __getattr__(name: str):
    if name == "copied_bytes":  # read-only: the counters live in the devices' runtimes
        return bytes_copied()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fetch(weights: list[torch.Tensor], region: str = "") -> list[torch.Tensor]:
    """Start copying the host values of ``weights`` into fresh device buffers."""
    try:
        # contiguous, as the fake kernel makes them; a third of torch.empty(w.shape, dtype=...,
        # device=...)'s time per weight
        buffers = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
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
    an event that ``wait`` joins.

    The host tensors are found once per set of weights (by their addresses) and kept until a
    parameter is placed or given back anywhere (``placement.generation``)."""
    if not buffers:
        return
    device = device_runtime(buffers[0].device)
    with _PLAIN_READS():
        key = tuple(map(_PTR, weights))
    generation = placement.generation()
    found = device.hosts.get(key)
    if found is None or found[0] != generation:
        if len(device.hosts) > _CACHED or (found is not None and found[0] != generation):
            device.hosts.clear()
        records = [_streamed_record_of(weight) for weight in weights]
        for record in records:
            record.fetched = True
        found = device.hosts[key] = (generation, records, sum(record.nbytes for record in records))
    device.copied_bytes += found[2]
    # read from the records each time: a dropped parameter's record lets its host tensor go
    _copy_in(buffers, [record.host for record in found[1]])


def _copy_in(buffers: list[torch.Tensor], hosts: list[torch.Tensor]) -> None:
    """``_start_copies`` from the host tensors themselves (whole or cut by ``_split``)."""
    if not buffers or buffers[0].device.type != "cuda":
        copy_all(buffers, hosts)
        return
    device = device_runtime(buffers[0].device)
    device.inflight[buffers[0].data_ptr()] = device.copy(buffers, hosts)


def wait(fetched: list[torch.Tensor]) -> None:
    """Make the compute stream wait until ``fetched`` holds its values."""
    if not fetched or fetched[0].device.type != "cuda":
        return
    device = device_runtime(fetched[0].device)
    key = fetched[0].data_ptr()
    if key in device.inflight:
        done = device.inflight.pop(key)
        if done is not None:
            device.join(done, device.compute_stream())
        return  # None: a head whose refill the wrapper issues after the call, nothing to join
    found = _serving(fetched)
    if found is not None and found.refilled is not None:
        # the wrapper's refill after the previous call (an external event: captured as a wait
        # on whatever it last recorded when this graph replays)
        device.compute_stream().wait_event(found.refilled)
        return
    if key in device.persistent:
        return  # a loose head's buffers: ready when the call started, nothing in flight
    raise RuntimeError(
        "fx_offload.wait found no copy in flight for its buffers: the graph's fetch and wait "
        "were separated (a graph edited after the offload pass?). Recompile the model"
    )


def release(fetched: list[torch.Tensor]) -> torch.Tensor:
    """End the life of ``fetched``; return a token that later fetches order themselves after."""
    if _registry.poison_released:
        found = _serving(fetched)
        if found is not None:  # a head's: poisoned at every call (a CUDA graph replays the fill)
            found.store.poisoned = True
        for buffer in fetched:
            buffer.fill_(float("nan") if buffer.is_floating_point() else torch.iinfo(buffer.dtype).max)
    device = fetched[0].device if fetched else torch.device("cpu")
    return torch.empty(0, device=device)


@dataclass(eq=False)
class _Store:
    """The persistent device buffers of a head and what they hold: shared by the heads of every
    graph that serves the same weights first (a generate()'s prompt and one-token graphs, a graph
    Dynamo compiled again for other shapes), so that those weights take device memory once.

    A store serves one thread: the first that takes a graph's heads with it (``owner``); a graph
    whose heads another thread takes while that one lives gives that thread buffers of its own."""

    buffers: list[torch.Tensor]
    # (data_ptrs, versions, placement generation) of the values in the buffers: the generation
    # moves when any parameter is placed or given back, so a store never takes the values of a
    # dropped model's weights for those of a model offloaded since at the same addresses
    holds: tuple = ()
    prefetched: bool = False  # they were copied by another graph's call (``prefetch``)
    # on a GPU, an external event: when the last copy into them issued after a call is done (None
    # for a small passed store, which the wrapper refills on the compute stream: ``inline``)
    refilled: torch.cuda.Event | None = None
    owner: weakref.ref | None = None  # to the thread its heads serve (None: none yet)
    key: tuple = ()  # its key in the device's ``stores`` (none: a thread's or a remade head's own)
    # data_ptrs -> weak references to their records (a dropped model leaves dead ones)
    known: dict[tuple[int, ...], list[weakref.ref]] = field(default_factory=dict)
    # packed: the buffers are views of this one device tensor, laid out as a pinned slab holds
    # host copies (``placement.packed_offsets``), so each run of the host copies of the weights
    # that fill them (``placement.runs``, whichever block of a stack) is one copy
    whole: torch.Tensor | None = None
    offsets: list[int] = field(default_factory=list)
    # a run's (first buffer, how many) -> the bytes of ``whole`` it spans (``_target``)
    spans: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    # data_ptrs of weights -> (placement generation, the device tensors each copy fills, the host
    # tensors it reads, weakly): ``copies`` as made for them (``copies_of``)
    made: dict[tuple[int, ...], tuple] = field(default_factory=dict)
    passed: bool = False  # the wrapper passes the buffers as a graph's inputs (no CUDA graph reads them)
    # a graph's release poisons them (``poison_released_buffers``): refilled after every call, even
    # with the values they held before it
    poisoned: bool = False
    # an in-line store's (``inline``) on a GPU: the stream that last read or wrote it, which a read
    # or copy on another stream of the same thread waits for first (``_ordered``)
    used_on: torch.cuda.Stream | None = None

    @classmethod
    def empty(cls, specs: list[tuple], passed: bool = False) -> _Store:
        """A store of new buffers, one per (shape, dtype, device) of ``specs``: ``passed`` ones packed
        in one device tensor, others each its own (an op's outputs must not alias)."""
        if not passed or len(specs) < 2:
            buffers = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in specs]
            return cls(buffers, passed=passed)
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype, _ in specs]
        offsets, nbytes = placement.packed_offsets(sizes)
        whole = torch.empty(nbytes, dtype=torch.uint8, device=specs[0][2])
        buffers = [
            whole[offset : offset + size].view(dtype).view(shape)
            for (shape, dtype, _), offset, size in zip(specs, offsets, sizes)
        ]
        return cls(buffers, whole=whole, offsets=offsets, passed=passed)

    @property
    def inline(self) -> bool:
        """Whether the wrapper refills the buffers on the compute stream, in line with the calls,
        not on the copy stream: passed ones of at most ``INLINE_BYTES`` (a norm's weights), whose
        copy takes less time than the events and stream switches that would order it."""
        return self.passed and self.nbytes <= INLINE_BYTES

    def __post_init__(self) -> None:
        self.nbytes = sum(buffer.nbytes for buffer in self.buffers)
        if self.buffers and self.buffers[0].device.type == "cuda" and not self.inline:
            self.refilled = torch.cuda.Event(external=True)
            copy = device_runtime(self.buffers[0].device).copy_stream()
            # the copy stream writes them: freed, wait for it before reuse
            for target in [self.whole] if self.whole is not None else self.buffers:
                target.record_stream(copy)

    def copies(self, records: list[placement.HostParameter], pointers: tuple = ()) -> tuple[list, list]:
        """The device and host tensors of one copy of ``records``' host values into the buffers:
        packed, one per run of their host copies, else one per buffer. Kept for ``copies_of`` under
        ``pointers``, the weights' data_ptrs, where given."""
        if self.whole is None:
            targets, hosts = self.buffers, list(map(_HOST, records))
        else:
            targets, hosts = [], []
            for first, count, host in placement.host_runs(records):
                targets.append(self._target(first, count))
                hosts.append(host)
        if pointers:
            if len(self.made) > _CACHED:
                self.made.clear()
            self.made[pointers] = (placement.generation(), targets, tuple(map(weakref.ref, hosts)))
        return targets, hosts

    def copies_of(self, pointers: tuple[int, ...]) -> tuple | None:
        """``(device tensors, host tensors)`` of the weights at ``pointers``, as ``copies`` made them
        for them in this placement generation, without a record or a parameter in sight (a refill
        after every call of a stack's piece); None where it made none or a host tensor is gone
        (given back: another thread's restore, a dropped model's finalizer)."""
        found = self.made.get(pointers)
        if found is None or found[0] != placement.generation():
            return None
        hosts = list(map(_DEREF, found[2]))
        for host in hosts:
            if host is None:
                return None
        return found[1], hosts

    def _target(self, first: int, count: int) -> torch.Tensor:
        """The device tensor that one copy of the run of ``count`` buffers from ``first`` fills: the
        buffer itself for one, else the bytes of ``whole`` they span (made once: refills run per call)."""
        if count == 1:
            return self.buffers[first]
        target = self.spans.get((first, count))
        if target is None:
            last = first + count - 1
            target = self.whole[self.offsets[first] : self.offsets[last] + self.buffers[last].nbytes]
            self.spans[(first, count)] = target
        return target


def _serves_another(store: _Store, thread: threading.Thread) -> bool:
    """Whether ``store`` serves a live thread other than ``thread``."""
    owner = store.owner() if store.owner is not None else None
    return owner is not None and owner is not thread and owner.is_alive()


@dataclass(eq=False)
class _Head:
    """One of a compiled graph's first regions (its head), for the calls of one thread: the
    persistent device buffers that serve it (its ``store``) and the graph's state of them.

    One per graph, head region and calling thread, whatever weights a call passes: a graph
    that Dynamo reuses for every block of a stack (a graph break inside the block) keeps one set,
    not one per block. The wrapper refills it after each call for the next one (after all the
    call queued), and copies it again before a call, on the compute stream, only when the call
    passes other weights or their values changed in place (what the buffers hold is the store's:
    another graph's call may have filled them).
    """

    store: _Store
    positions: list[int]  # where the region's weights are among the graph's inputs
    region: str = ""  # its name in the graph: two head regions may read the same weights
    token: int | None = None  # its graph's in the device's call sequence
    current: tuple[int, ...] = ()  # data_ptrs of the weights of the call running
    deferred: bool = False  # the graph's refill left the copies to the wrapper
    in_graph: int = 0  # of them, the first bytes the graph copied itself (its refill's in_graph)
    in_graph_versions: tuple[int, ...] = ()  # the weights' versions when the graph copied them
    weights: tuple = ()  # the weights of the call running (cleared after it: nothing kept alive)
    # a graph reused for several blocks: the weights each call passed -> those of the call after
    # it last time, so that the refill after a call loads the block that comes next
    successor: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)
    # the data_ptrs of the weights this graph's calls passed -> their versions when the last such
    # call began (a refill of them notes these, read no parameter: ``_refill_after``)
    ran: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.buffers = self.store.buffers
        self.known = self.store.known
        self.nbytes = self.store.nbytes
        # the buffers' device's runtime, found once: the calls' paths read it every call
        self.runtime = device_runtime(self.buffers[0].device) if self.buffers else None
        take = operator.itemgetter(*self.positions) if self.positions else (lambda args: ())
        # the region's weights among a call's inputs, as a tuple (C-level)
        self.take = take if len(self.positions) != 1 else (lambda args: (take(args),))

    @property
    def holds(self) -> tuple:
        return self.store.holds

    @property
    def refilled(self) -> torch.cuda.Event | None:
        return self.store.refilled

    @property
    def prefetched(self) -> bool:
        """Whether another graph's prefetch issued the copy of what the buffers hold."""
        return self.store.prefetched

    def filled(self, pointers: tuple = (), versions: tuple = (), prefetched: bool = False) -> None:
        """The buffers hold the values ``versions`` of the weights at ``pointers`` (none: unknown),
        copied by a prefetch of another graph's or not."""
        self.store.holds = (pointers, versions, placement.generation()) if pointers else ()
        self.store.prefetched = prefetched

    @property
    def records(self) -> list[placement.HostParameter]:
        """The records of the weights of the call running."""
        return self._records(self.current)

    def _records(self, pointers: tuple[int, ...]) -> list[placement.HostParameter]:
        records = list(map(_DEREF, self.known.get(pointers, ())))  # C-level: runs on every call
        return records if all(records) else []

    def _like(self) -> _Head:
        """A head like this one with buffers of its own, for another thread."""
        specs = [(b.shape, b.dtype, b.device) for b in self.buffers]
        store = _Store.empty(specs, passed=self.store.passed)
        return _Head(store, list(self.positions), self.region, self.token)


class GraphRuntime:
    """One compiled graph's call-time state: its head buffers, per calling thread.

    Made by the backend at compile time (``declare_head`` for each head region), owned by the
    compiled function's wrapper, which calls ``enter`` and ``leave`` around every call.
    """

    def __init__(self) -> None:
        self._first: list[_Head] = []  # made at compile time, for the first thread that calls
        # passed heads' (shape, dtype, device)s, positions, region and store key: made after a drop
        self._remade: list[tuple[list[tuple], list[int], str, tuple]] = []
        self._sets: weakref.WeakKeyDictionary[threading.Thread, list[_Head]] = weakref.WeakKeyDictionary()
        self._dropped = False
        self._local = threading.local()  # ``heads``: the calling thread's set, once it has one
        self.device: DeviceRuntime | None = None
        # its heads are passed as inputs: the graph has no head or refill op and none of its waits
        # is for a head, so its calls are not put on the thread's stack of running graphs
        self.passes = False
        self.token: int | None = None  # names the graph in its device's call sequence
        self.name = ""  # how ``last_forward`` names it: Dynamo's trace id (or its token)

    def declare_head(
        self, example_inputs: list, positions: list[int], region: str = "", passed: bool = False
    ) -> None:
        """At compile time: make (or share, ``_store``) the buffers of one head region of the graph
        (the next of its first regions), given the positions of its weights among the graph's
        inputs. Made at the first run instead, they would land in the memory pool of a CUDA graph
        tree that is warming up, which refuses them. ``passed``: the wrapper passes them as the graph's inputs
        (no CUDA graph holds their addresses), so after ``drop_heads`` the next call makes them
        again."""
        weights = [example_inputs[p] for p in positions]
        if self.device is None and weights:
            self.device = device_runtime(weights[0].device)
            self.device.graphs.add(self)
            self.token = self.device.sequence.graph(self)
            self.device.by_token[self.token] = self
            # Dynamo's id of the compile and its attempt, as the logs show it ([18/0_1])
            trace_id = torch._guards.CompileContext.current_trace_id()
            self.name = f"[{trace_id}]" if trace_id is not None else str(self.token)
        self._first.append(_Head(self._store(weights, passed), list(positions), region, self.token))
        if passed:
            self.passes = True
            specs = [(w.shape, w.dtype, w.device) for w in weights]
            store = self._first[-1].store
            self._remade.append((specs, list(positions), region, store.key))

    def _store(self, weights: list[torch.Tensor], passed: bool) -> _Store:
        """The buffers of a head of ``weights``: those of another graph's head of the same weights
        (the device's ``stores``), else new ones. Never another head's of this graph: a module
        called twice makes two head regions of its weights, and one's refill must not overwrite
        what the other still reads; the second shares with another graph's second.

        Buffers ``passed`` as the graph's inputs are packed in one device tensor (``_Store``);
        those a ``head`` op returns are not: an op's outputs must not alias each other. So the two
        kinds share with their own kind only."""
        if not weights:
            return _Store([])
        weights_key = tuple((w.data_ptr(), w.shape, w.dtype) for w in weights)
        # the how-manieth head of these weights in this graph: each shares with the same one elsewhere
        count = sum(h.store.key[0] == weights_key for h in self._first if h.store.key)
        specs = [(w.shape, w.dtype, w.device) for w in weights]
        return self._shared((weights_key, count, passed), specs, self._first, passed)

    def _shared(self, key: tuple, specs: list[tuple], first: list[_Head], passed: bool = False) -> _Store:
        """The device's store under ``key`` unless one of ``first`` (this graph's heads) has it;
        else a new one of ``specs``, under ``key`` where that is free. (What a store holds names
        the placement generation: sharing one kept since a restore serves no stale values.)"""
        stores = self.device.stores
        found = stores.get(key) if key else None
        if found is not None and not any(h.store is found for h in first):
            return found
        made = _Store.empty(specs, passed)
        if key and found is None:
            stores[key] = made
            made.key = key
        return made

    def heads(self) -> list[_Head]:
        """Every head of the graph, of every thread that called it."""
        if self._dropped:
            return []
        sets = list(self._sets.values())
        if not any(heads is self._first for heads in sets):
            sets.append(self._first)
        return [found for heads in sets for found in heads]

    def drop_heads(self) -> None:
        """Free the head buffers; later calls serve their head regions from loose heads, or, where
        the heads are passed as inputs, from new buffers made at the next call (sharing again
        where other graphs' heads of the same weights live)."""
        with _registry.lock:  # not while a thread new to the graph takes its set
            self._dropped = True
            self._first, self._sets = [], weakref.WeakKeyDictionary()
            self._local = threading.local()

    def holds_any(self, records: set[int]) -> bool:
        """Whether a call of the graph passed a head weights whose records' ids are in ``records``
        (not another graph's call that shares the head's buffers: restoring a model that ran
        through that graph alone leaves this graph its heads)."""
        for found in self.heads():
            for pointers in found.ran:
                refs = found.known.get(pointers, ())
                if any(id(ref()) in records for ref in refs if ref() is not None):
                    return True
        return False

    def _thread_heads(self) -> list[_Head]:
        if self._dropped and self._remade:  # (restored, and offloaded again): made anew, empty
            with _registry.lock:
                if self._dropped:
                    first: list[_Head] = []
                    for specs, positions, region, key in self._remade:
                        store = self._shared(key, specs, first, passed=True)
                        first.append(_Head(store, positions, region, self.token))
                    self._first, self._dropped = first, False
        if self._dropped or not self._first:
            return []
        local = self._local  # read once: drop_heads may replace it
        heads = getattr(local, "heads", None)
        if heads is not None:
            return heads  # (a thread's own: a new thread that takes an ended one's ident has none)
        thread = threading.current_thread()
        # one lock for every graph: two threads new to graphs that share stores must not both take them
        with _registry.lock:
            if self._dropped or not self._first:
                return []  # (dropped meanwhile: nothing to cache)
            heads = self._sets.get(thread)
            if heads is None:  # the compile-time set, or, if a live thread has it or its stores, a new one
                taken = any(held is self._first for held in self._sets.values())
                taken = taken or any(_serves_another(found.store, thread) for found in self._first)
                heads = [found._like() for found in self._first] if taken else self._first
                for found in heads:
                    found.store.owner = weakref.ref(thread)
                self._sets[thread] = heads  # made here, in the wrapper: outside any capture
            local.heads = heads
        return heads

    @property
    def has_heads(self) -> bool:
        """Whether the graph serves head regions (else its wrapper has nothing to do for them)."""
        return bool(self._first)

    def enter(self, args) -> list[_Head]:
        """Before one call of the compiled graph: make the calling thread's heads hold this call's
        weights, tell the device's call sequence which call starts (and so count where the copy
        of its heads was issued). Returns what ``leave`` takes after the call.

        Runs in Python on every call, CUDA-graph replays included, outside the captured graph.
        A call whose heads already hold its weights, unchanged, costs a C-level read of their
        addresses and version counters per head, compared with what the head's store holds.
        """
        heads = getattr(self._local, "heads", None)  # the thread's set, once it has one
        if heads is None:
            heads = self._thread_heads()
        held, own = True, True
        generation = placement.generation()  # (what a head holds is stale once it moved)
        interned = self.device.interned if heads else None
        for found in heads:
            weights = found.take(args)
            with _PLAIN_READS():
                pointers, versions = tuple(map(_PTR, weights)), tuple(map(_VERSION, weights))
            pointers = interned.setdefault(pointers, pointers)
            if pointers != found.current:
                if found.current:
                    found.successor[found.current] = pointers
                found.current = pointers
            found.ran[pointers] = versions
            found.weights = weights
            store = found.store
            if store.holds != (pointers, versions, generation):
                held = False
                _fill(found, list(weights), pointers)
            elif store.prefetched:
                own = False
        if not self.passes:
            _registry.stack().append(heads)
        if heads:
            device = self.device
            if len(heads) == 1:
                key = heads[0].current
            else:
                key = tuple(found.current for found in heads)
                key = interned.setdefault(key, key)
            origin = device.sequence.arrive(self.token, key, held, own)
            counters["fx_offload"][_COUNTED[origin]] += 1
        return heads

    def passed(self, inputs, heads: list[_Head]) -> list:
        """The inputs to call a graph that reads its heads as inputs with (``heads_as_inputs``): each
        head's weights replaced by its buffers, which ``enter`` made hold them; on a GPU the
        compute stream of each head's device first waits for the copy into them (the refill after
        the previous call, or another graph's prefetch), in Python, outside the graph. The wrapper
        refills them after the call, all of them (no graph ``refill`` copies part of them within).
        After ``drop_heads`` the next call's heads are new buffers (``_thread_heads``)."""
        positions, values = [], []
        for found in heads:
            refilled = found.store.refilled
            if refilled is not None:  # (``_ordered``'s case of every call of a large head, in line)
                _WAIT(refilled, found.runtime.compute_stream())
            else:
                _ordered(found)
            found.deferred = True
            positions += found.positions
            values += found.buffers
        return replaced(inputs, positions, values)

    def leave(self, heads: list[_Head]) -> None:
        """After the call (also when it raised): refill the heads for this graph's next call, then
        start the copy of the heads of the call the device's sequence expects next, if it is
        another graph's and they do not hold its weights."""
        if not self.passes:
            _registry.stack().pop()
        for found in heads:  # in region order: the copy stream is FIFO
            if found.deferred:
                _refill_after(found)
            else:
                found.filled(found.current, _versions(found.records))
            found.weights = ()
        if heads:
            following = self.device.sequence.next
            if following is not None and following.graph != self.token and following.weights:
                graph = self.device.by_token.get(following.graph)
                if graph is not None:
                    graph.prefetch(following.weights)

    def prefetch(self, key: tuple) -> None:
        """Copy into this graph's heads (of the calling thread) the weights of a call guessed to
        come next (``key`` as ``enter`` gave it to the sequence), where they hold other values.
        A wrong guess costs the copy: ``enter`` checks what the heads hold before the call.
        Only into a set the calling thread has (it called this graph): a thread never takes a
        graph's heads by guessing that another thread's call comes next (the device's sequence is
        one for every thread). Heads dropped by ``restore`` are made again by the graph's own next
        call, not here: the model may stay restored."""
        heads = getattr(self._local, "heads", None)
        if self._dropped or not heads:
            return
        keys = (key,) if len(heads) == 1 else key
        for found, pointers in zip(heads, keys):
            holds = found.store.holds
            if holds and holds[0] == pointers:
                continue  # (written in place since: the call's check copies it again)
            records = found._records(pointers)
            if not records:
                continue
            found.filled(pointers, _versions(records), prefetched=True)
            _copy_head(found, records, 0, pointers)
            counters["fx_offload"]["cross_graph_prefetches"] += 1


def replaced(inputs, positions, values) -> list:
    """``inputs`` with ``values`` at ``positions`` (what a wrapper passes a graph in place of the
    parameters there): a boxed call's list changed in place (the compiled function owns it and
    empties it), else a new list."""
    passed = inputs if isinstance(inputs, list) else list(inputs)
    for position, value in zip(positions, values):
        passed[position] = value
    return passed


def _refill_after(found: _Head) -> None:
    """After a call: copy the head weights of the next call into the head buffers, on the copy
    stream after all the call queued on its stream (the head's readers among it); the next call's
    graph waits for them. Nothing is copied where the buffers hold those weights already, their
    version counters unchanged since a call last passed them (a graph called again with the
    weights it read).

    The next call passes the same weights, unless Dynamo reuses the graph for several blocks:
    then the refill loads the block that followed this one last time (a wrong guess costs a copy
    before the call, as without a refill). Where the graph's refill copied the first bytes of
    these same weights during the call (``in_graph``), only the rest is copied here."""
    store, current = found.store, found.current
    following = found.successor.get(current, current)
    if following == current and found.in_graph >= found.nbytes and found.weights:
        with _PLAIN_READS():
            versions = tuple(map(_VERSION, found.weights))
        if versions == found.in_graph_versions:  # the graph copied it all, nothing written since
            found.filled(following, versions)
            return
    # the whole head as copied before (no records, runs or views to find), else its records. The
    # versions it notes are those the weights had when a call last passed them, not read now (the
    # next block's parameters: memory no call has touched since): the copy reads their values as
    # of now, so where one was written since, the next call sees versions that moved and copies
    # again, as for a write after the refill
    made = store.copies_of(following) if not found.in_graph else None
    if made is not None:
        versions = found.ran.get(following, ())
    else:
        records = found._records(following)
        if not records:  # the block that followed is gone: refill with the current one
            following, records = current, found.records
        versions = _versions(records)
    holds = (following, versions, placement.generation())
    held = store.holds == holds and not store.poisoned
    # (``filled``, in line; held: since the call before, as a refill would leave it)
    store.holds, store.prefetched = holds if following else (), False
    if held:
        return  # they hold these values already: the same weights again, unchanged (a graph's own)
    if made is not None:
        found.runtime.copied_bytes += found.nbytes
        _issue(found, *made)
        return
    copied = found.in_graph if following == current else 0  # by the graph, in the call
    if copied and versions != found.in_graph_versions:
        copied = 0  # written in place after the graph's own refill (offload_eager stores late)
    _copy_head(found, records, copied, following)


def _copy_head(
    found: _Head, records: list[placement.HostParameter], copied: int, pointers: tuple[int, ...]
) -> None:
    """Copy ``records``' host values (of the weights at ``pointers``) but their first ``copied``
    bytes into ``found``'s buffers: on a GPU on the copy stream, after all the compute stream
    queued, ending with ``refilled``."""
    device = found.runtime
    if copied:
        _, pairs = _split(found.buffers, list(map(_HOST, records)), copied)
        buffers, hosts = [buffer for buffer, _ in pairs], [host for _, host in pairs]
        device.count(records, sum(buffer.nbytes for buffer in buffers))
    else:  # the whole head: no cut, and its records were marked fetched when it was first filled
        buffers, hosts = found.store.copies(records, pointers)
        device.copied_bytes += found.nbytes
        if not records[0].fetched:
            device.count(records, 0)
    _issue(found, buffers, hosts)


def _issue(found: _Head, buffers: list[torch.Tensor], hosts: list[torch.Tensor]) -> None:
    """Copy ``hosts`` into ``buffers``, ``found``'s: on a GPU on the copy stream after all the
    compute stream queued, ending with ``refilled``; an in-line store's and elsewhere on the current
    stream. Where that raises, the head holds nothing known (its caller noted what it would hold)."""
    try:
        refilled = found.store.refilled
        if refilled is None:
            _in_line(found, buffers, hosts)
        else:
            found.runtime.copy_each(((buffers, hosts, refilled),))
    except BaseException:
        found.filled()
        raise


def _in_line(found: _Head, buffers: list[torch.Tensor], hosts: list[torch.Tensor]) -> None:
    """Copy on the current stream, after what last used the buffers (``_ordered``)."""
    _ordered(found)
    copy_all(buffers, hosts)


def _ordered(found: _Head) -> None:
    """Make the current stream wait for what last used ``found``'s buffers before it reads or
    writes them: the copy stream's last copy into them (``refilled``, an external event), or, for
    an in-line store, the stream that last read or wrote it where that is another (one thread
    driving a model on two streams; another graph's prefetch), then noted as the last."""
    if found.refilled is not None:
        _WAIT(found.refilled, found.runtime.compute_stream())
        return
    store = found.store
    if store.inline and found.runtime.device.type == "cuda":
        current = found.runtime.compute_stream()
        if store.used_on is not None and store.used_on is not current:
            current.wait_stream(store.used_on)
        store.used_on = current


def _fill(found: _Head, weights: list[torch.Tensor], pointers: tuple[int, ...]) -> None:
    """Before a call, on the compute stream: copy ``weights`` (at addresses ``pointers``, which
    ``enter`` has made the head's current ones) into the head where it holds other values."""
    if len(found.runtime.interned) > _CACHED:  # (weights met since are interned anew)
        found.runtime.interned.clear()
    records = found._records(pointers)
    # the same addresses may carry other records: restored and offloaded again in place
    if not records or placement.lookup(weights[0]) is not records[0]:
        records = [_streamed_record_of(w) for w in weights]
        _forget_dead(found)
        found.known[pointers] = [weakref.ref(record) for record in records]
        found.filled()
    versions = _versions(records)
    if found.holds == (pointers, versions, placement.generation()):
        return  # the previous call refilled it with these values
    device = found.runtime
    found.filled()  # (until the copy is issued)
    # on the compute stream, before the call, after the previous call's refill (it writes them too)
    _in_line(found, *found.store.copies(records))
    device.count(records)
    found.filled(pointers, versions)


def _forget_dead(found: _Head) -> None:
    """Drop what a head remembers of weights whose parameters are gone."""
    dead = [pointers for pointers, refs in found.known.items() if any(ref() is None for ref in refs)]
    for pointers in dead:
        del found.known[pointers]
        found.successor.pop(pointers, None)
        found.ran.pop(pointers, None)
    for pointers, following in list(found.successor.items()):
        if following in dead:
            del found.successor[pointers]


# an event's record and wait on a given stream, as torch's own C methods: torch.cuda.Event's and
# Stream.wait_event's Python wrappers add frames to calls made several times per graph call
# (a CPU build of torch has no such methods, nor any CUDA event to call them on)
_RECORD = getattr(torch.cuda.Event.__mro__[1], "record", torch.cuda.Event.record)
_WAIT = getattr(torch.cuda.Event.__mro__[1], "wait", torch.cuda.Event.wait)
# make a stream of the current device the current stream: ``torch.cuda.set_stream``'s own call,
# without its device lookups
_SET_STREAM = getattr(torch._C, "_cuda_setStream", None)
_PTR = torch.Tensor.data_ptr
_PLAIN_READS = placement.plain_reads  # around the reads of many weights' addresses and versions
_VERSION = operator.attrgetter("_version")
_DEREF = weakref.ref.__call__  # a weak reference's referent, for map()
_PARAM = operator.attrgetter("param")
_HOST = operator.attrgetter("host")
_CACHED = 1 << 12  # sets of weights whose host tensors or views are kept (then all are dropped)
_FREE_EVENTS = 64  # events kept free for reuse per device
# a passed head's store of at most this many bytes is refilled on the compute stream (``_Store.inline``):
# a copy of 64 KiB takes about 1 us at 55 GB/s, less than the Python and CUDA calls (events, stream
# switches, about 30 us per call measured on the towers' pieces) that would let it overlap a call
INLINE_BYTES = 64 << 10
# the counters (``counters["fx_offload"]``) of calls with heads, by where their copy was issued
_COUNTED = {origin: "head_copy_" + origin.value.replace(" ", "_") for origin in Origin}


def _versions(records: list) -> tuple[int, ...]:
    """The version counters of ``records``' parameters (0 for one that is gone); C-level maps, as
    this runs on every call with heads."""
    try:
        with _PLAIN_READS():
            return tuple(map(_VERSION, map(_DEREF, map(_PARAM, records))))
    except AttributeError:  # a parameter is gone
        params = [record.param() for record in records]
        return tuple(param._version if param is not None else 0 for param in params)


def _running_heads() -> list[_Head]:
    stack = _registry.stack()
    return stack[-1] if stack else []


def head(weights: list[torch.Tensor], region: str = "") -> list[torch.Tensor]:
    """The head buffers of the graph running for ``region``, which hold ``weights``' values (a
    module called twice, or a tied weight, makes two head regions of the same weights)."""
    pointers = tuple(w.data_ptr() for w in weights)
    running = _running_heads()
    heads = [h for h in running if h.current == pointers]
    for found in heads:
        if found.region == region:
            return found.buffers
    if heads:
        return heads[0].buffers
    if running:  # the wrapper holds buffers for other weights than the graph's head reads
        raise RuntimeError(
            f"fx_offload.head: no head buffers of the graph running hold the weights of region "
            f"{region!r} (its heads: {[h.region for h in running]}): the compiled graph and its "
            "wrapper disagree, a bug in fx_offload; please report it with the model"
        )
    return _loose_head(weights)


def _serving(buffers: list[torch.Tensor]) -> _Head | None:
    """The head of the graph running, if ``buffers`` are its buffers."""
    if not buffers:
        return None
    pointer = buffers[0].data_ptr()
    return next((h for h in _running_heads() if h.buffers[0].data_ptr() == pointer), None)


def refill(buffers: list[torch.Tensor], weights: list[torch.Tensor], in_graph: int = 0) -> None:
    """Refill the head ``buffers`` with ``weights`` for the next call. A graph's own head (under
    its wrapper): copy the first ``in_graph`` bytes now, on the copy stream (they overlap the
    compute after the call's last fetch, and the graph's ``join`` of these buffers joins
    them), and leave the rest to the wrapper, after the call. A loose head (no wrapper): copy it
    all now; the graph's ``join`` joins it."""
    found = _serving(buffers)
    if found is None:
        _start_copies(buffers, weights)
        return
    found.deferred = True
    if found.successor:  # a graph reused for several blocks: the next call passes other weights
        in_graph = 0  # (the wrapper refills the next block's whole head after the call)
    first = []
    if in_graph:
        records = found.records or [_record_of(w) for w in weights]
        first = _split(buffers, [record.host for record in records], in_graph)[0]
    found.in_graph = sum(b.nbytes for b, _ in first)
    if first:
        found.in_graph_versions = tuple(map(_VERSION, found.weights)) if found.weights else _versions(records)
    else:
        found.in_graph_versions = ()
    device = device_runtime(buffers[0].device)
    device.copied_bytes += found.in_graph
    if first:
        _copy_in([b for b, _ in first], [h for _, h in first])
    elif buffers[0].device.type == "cuda":
        device.inflight[buffers[0].data_ptr()] = None


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


def _loose_head(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Without the wrapper: one persistent copy per weight, copied again here (outside capture)
    when its version counter moved."""
    if not weights:
        return []
    device = device_runtime(weights[0].device)
    buffers = []
    capturing = weights[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    for weight in weights:
        record = _streamed_record_of(weight)
        found = device.loose_heads.get(weight.data_ptr())
        if found is None or found.record() is not record:
            if capturing:
                raise RuntimeError(
                    "fx_offload.head met a new weight while a CUDA graph is being captured; run "
                    "the compiled model once without capture first"
                )
            _forget_dead_loose(device)
            if found is not None:
                device.persistent.discard(found.buffer.data_ptr())
            buffer = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            found = device.loose_heads[weight.data_ptr()] = _LooseHead(buffer, weakref.ref(record), -1)
            device.persistent.add(buffer.data_ptr())
        version = _versions([record])[0]
        if found.version != version and not capturing:
            found.buffer.copy_(record.host, non_blocking=True)
            device.count([record])
            found.version = version
        buffers.append(found.buffer)
    return buffers


def _forget_dead_loose(device: DeviceRuntime) -> None:
    for pointer, found in list(device.loose_heads.items()):
        if found.record() is None:
            del device.loose_heads[pointer]
            device.persistent.discard(found.buffer.data_ptr())


def last_forward(device: torch.device | str | None = None) -> str:
    """The last forward's calls of graphs with heads, as the device's call sequence recorded
    them: in order, each with its graph (Dynamo's trace id, as the logs show it), the module
    holding its weights and where the copy of its heads was issued (``sequence.Origin``).
    ``device`` defaults to the one device that ran any (a CUDA device before the CPU)."""
    forward, names = _last_forward(device)
    if forward is None:
        return "no forward recorded: no compiled graph with head regions has run"
    counts = ", ".join(f"{origin.value}: {n}" for origin, n in forward.counts().items())
    return f"{len(forward.calls)} calls ({counts})\n{forward.format(names, _weights_name)}"


def _weights_name(key: tuple) -> str:
    """A call's weights (their data_ptrs, per head) as the model names them: the module holding
    them all, where they are still offloaded."""
    pointers = [p for part in key for p in (part if isinstance(part, tuple) else (part,))]
    records = [placement.at(pointer) for pointer in pointers]
    module = common_module(r.names[0] for r in records) if all(records) else ""
    return f"{module} ({len(pointers)} weights)" if module else f"{len(pointers)} weights"


def _last_forward(device) -> tuple[Forward | None, dict]:
    found = _registry.devices.get(torch.device(device)) if device is not None else None
    if device is None:
        ran = [d for d in _registry.devices.values() if d.sequence.forwards]
        found = max(ran, key=lambda d: d.device.type == "cuda", default=None)
    if found is None or not found.sequence.forwards:
        return None, {}
    names = {token: graph.name for token, graph in list(found.by_token.items())}
    return found.sequence.forwards[-1], names


def live_heads() -> list[_Head]:
    """The heads of every live compiled graph, of every thread that called it."""
    return [
        found
        for device in list(_registry.devices.values())
        for g in list(device.graphs)
        for found in g.heads()
    ]


def persistent_bytes() -> int:
    """Device bytes held between calls by head buffers (of every live compiled graph)."""
    stores = {id(found.store): found.store for found in live_heads()}  # (graphs share some)
    total = sum(store.nbytes for store in stores.values())
    for device in list(_registry.devices.values()):
        loose = [found.buffer for found in device.loose_heads.values() if found.record() is not None]
        total += sum(buffer.nbytes for buffer in loose)
    return total


def forget_heads(records: list[placement.HostParameter]) -> None:
    """Free the persistent copies that held ``records`` (on restore): the loose heads of their
    weights, and the head buffers of every graph whose heads held them."""
    ids = {id(record) for record in records}
    for device in list(_registry.devices.values()):
        for pointer, found in list(device.loose_heads.items()):
            if found.record() is None or id(found.record()) in ids:
                del device.loose_heads[pointer]
                device.persistent.discard(found.buffer.data_ptr())
        for graph in list(device.graphs):
            if graph.holds_any(ids):
                graph.drop_heads()


def swapped(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The device copies of swapped ``weights``, in their component's range of the arena: found
    once per set of weights (by address, until ``placement.generation`` moves); each call checks
    that their components are on the device."""
    if not weights:
        return []
    device = device_runtime(weights[0].device)
    with _PLAIN_READS():
        key = tuple(map(_PTR, weights))
    generation = placement.generation()
    found = device.views.get(key)
    if found is not None and found[0] == generation:
        if all(getattr(ref(), "resident", False) for ref in found[1]):
            return list(found[2])
    elif len(device.views) > _CACHED or found is not None:
        device.views.clear()
    buffers = _swapped_views(weights)
    components = {_record_of(weight).component: None for weight in weights}
    device.views[key] = (generation, tuple(map(weakref.ref, components)), tuple(buffers))
    return buffers


def _swapped_views(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    buffers = []
    for weight in weights:
        record = _record_of(weight)
        component = record.component
        if component is None:
            raise RuntimeError(
                f"parameter {record.names[0]!r} is no longer swapped (restored and offloaded again "
                "with policy 'stream'?), but this compiled graph reads it as swapped. Call "
                "torch._dynamo.reset() and compile the model again"
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


def _streamed_record_of(weight: torch.Tensor) -> placement.HostParameter:
    """``_record_of`` for a graph compiled to stream ``weight``: refuses one swapped since."""
    record = _record_of(weight)
    if record.component is not None:
        raise RuntimeError(
            f"parameter {record.names[0]!r} is swapped (restored and offloaded again with policy "
            "'swap'?), but this compiled graph streams it. Call torch._dynamo.reset() and compile "
            "the model again"
        )
    return record


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
