"""Where each parameter lives: pinned host memory, a device-typed alias of it, and the way back.

An offloaded parameter keeps its ``nn.Parameter`` object; only its ``.data`` changes. The values
live once, in (pinned) host memory. On a GPU the parameter's data becomes a device-typed alias of
that host memory (made through ``__cuda_array_interface__``), so Dynamo traces the model as a
device model and eager code stays correct (slow: it reads over the bus). On ``device="cpu"``
host and device are the same memory and the alias is the host tensor itself. Pinned host copies
are views of power-of-two slabs (``slab_layout``), which torch's pinned allocator does not round
up further.

The compiled graph never reads the alias: ``fetch`` copies from the host tensor, which it finds
here by the alias's address.

An offloaded ``nn.Parameter`` also changes class, to a subclass of its own (``OffloadedParameter``
for a plain one). Dynamo guards on a tensor's type, so a graph compiled for an offloaded block is
never reused for a resident one, or the other way round: after a graph break, Dynamo otherwise
reuses one graph for every block of a stack with that block's weights as inputs. A swapped
parameter (``fx_offload.swap``) takes another subclass (``SwappedParameter``), so a graph compiled
to read swapped weights from their arena is never reused for streamed ones, or the other way round.

``generation()`` counts placements and restores: the runtime caches what it found for a set of
addresses (host tensors, arena views) and looks again only when the count moved.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils.weak import WeakIdKeyDictionary

# data_ptr of an offloaded parameter's data -> its record. Entries leave with their parameter.
_records: dict[int, HostParameter] = {}
# every parameter placed, even after its data was replaced: to say so instead of running resident
_placed: WeakIdKeyDictionary = WeakIdKeyDictionary()
# parameters of streamed modules that ``offload`` left on the device (``keep_vectors``)
_kept: WeakIdKeyDictionary = WeakIdKeyDictionary()
# placements and restores so far: a cache keyed by data addresses is stale once it moves
_changes = [0]


def generation() -> int:
    """A number that changes whenever a parameter is placed, swapped or given back."""
    return _changes[0]


# Reading a tensor attribute (``data_ptr()``, ``_version``) of a Parameter subclass first looks
# up its ``__torch_function__`` through Python's attribute lookup: about 0.07 us more per read than
# a plain Parameter's, and the runtime reads those of every offloaded weight of every graph call.
# Inside this context the reads are plain ones. Only around such reads: it also turns off the
# ``__torch_function__`` of any tensor subclass the user's weights may be.
plain_reads = torch._C.DisableTorchFunctionSubclass


@dataclass(eq=False)
class HostParameter:
    """One offloaded parameter: its names, its host copy and the device it computes on."""

    names: tuple[str, ...]
    host: torch.Tensor
    device: torch.device
    pinned: bool
    param: weakref.ref = field(repr=False)
    original_class: type = field(default=torch.Tensor, repr=False)
    component: object = field(default=None, repr=False)  # its fx_offload.swap.Component, if swapped
    fetched: bool = field(default=False, repr=False)  # a compiled graph has copied it in
    # host addresses of weights read together that start with this one -> their runs, each with
    # the one host tensor a copy reads (``host_runs``)
    runs: dict = field(default_factory=dict, repr=False)

    @property
    def policy(self) -> str:
        return "stream" if self.component is None else "swap"

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()


def keep(param: nn.Parameter) -> None:
    """Note that ``offload`` left ``param``, inside a streamed module, on the device."""
    _kept[param] = True


def unkeep(param: nn.Parameter) -> None:
    _kept.pop(param, None)


def is_kept(param: nn.Parameter) -> bool:
    """Whether ``offload`` left ``param`` on the device inside a streamed module."""
    return param in _kept


def lookup(tensor: torch.Tensor) -> HostParameter | None:
    """The record of the offloaded parameter whose data ``tensor`` is, or ``None``."""
    if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
        return None
    if isinstance(tensor, torch._subclasses.FakeTensor):
        return None
    record = _records.get(tensor.data_ptr())
    if record is None or record.host.shape != tensor.shape or record.host.dtype != tensor.dtype:
        return None
    if record.host.stride() != tensor.stride():  # a view of the same shape (a square weight's .t())
        return None
    return record


def at(pointer: int) -> HostParameter | None:
    """The record of the offloaded parameter whose data starts at ``pointer``, or ``None``."""
    return _records.get(pointer)


def any_placed() -> bool:
    """Whether any parameter in the process is offloaded now."""
    return bool(_records)


def records() -> list[HostParameter]:
    """The records of every parameter offloaded now."""
    return list(_records.values())


def place(
    params: list[tuple[nn.Parameter, tuple[str, ...]]],
    device: torch.device,
    pin_memory: bool | None,
) -> list[HostParameter]:
    """Move each parameter's values to host memory and give it a device-typed alias.

    Args:
        params: the parameters with every qualified name each one has (tied ones have several).
        device: where the model computes.
        pin_memory: pin the host copy; ``None`` pins where the device needs it.
    Returns:
        The records, in the order given. Parameters already placed are returned as they are.
    """
    records: list[HostParameter] = []
    made: list[HostParameter] = []
    try:
        placing = [param for param, _ in params if lookup(param.data) is None]
        hosts = _pinned_hosts(placing, device, pin_memory)
        for param, names in params:
            existing = lookup(param.data)
            if existing is not None:
                records.append(existing)
                continue
            made.append(_place_one(param, names, device, pin_memory, hosts.get(id(param))))
            records.append(made[-1])
    except BaseException:
        for record in made:  # all or nothing: no model is left half on each side
            unplace(record)
        raise
    return records


def _place_one(
    param: nn.Parameter,
    names: tuple[str, ...],
    device: torch.device,
    pin_memory: bool | None,
    host: torch.Tensor | None = None,
) -> HostParameter:
    if host is not None:  # its place in a pinned slab, filled here
        host.copy_(param.data)
        pinned = True
    else:
        host, pinned = _host_copy(param.data, device, pin_memory, names[0])
    param.data = _device_alias(host, device)
    record = HostParameter(names, host, device, pinned, weakref.ref(param), type(param))
    if isinstance(param, nn.Parameter):
        param.__class__ = _offloaded_class(type(param))
    key = param.data.data_ptr()
    _records[key] = record
    _placed[param] = record
    _changes[0] += 1
    weakref.finalize(param, _forget, key, record)
    return record


def set_component(record: HostParameter, component: object) -> None:
    """Make ``record``'s parameter a swapped one, of ``component`` (its class changes with it, so
    Dynamo does not reuse a graph compiled for streamed weights)."""
    record.component = component
    _changes[0] += 1
    param = record.param()
    if isinstance(param, nn.Parameter) and type(param) is _offloaded_classes.get(record.original_class):
        param.__class__ = _swapped_class(record.original_class)


def unplace(record: HostParameter) -> None:
    """Give the parameter device memory again, with the same values, and forget the record."""
    param = record.param()
    if param is not None and lookup(param.data) is record:
        # on the CPU the host tensor already is device memory
        param.data = record.host if record.device.type == "cpu" else record.host.to(record.device)
    if param is not None and type(param) in (
        _offloaded_classes.get(record.original_class),
        _swapped_classes.get(record.original_class),
    ):
        param.__class__ = record.original_class
    _changes[0] += 1
    for key, value in list(_records.items()):
        if value is record:
            del _records[key]
    if param is not None:
        _placed.pop(param, None)
    # the host copy goes now (on a GPU, its share of a pinned slab), not when the parameter does:
    # the finalizer and any plan still hold the record
    record.host = record.host.new_empty(0)
    record.runs = {}


def replaced(tensor: torch.Tensor) -> HostParameter | None:
    """The record of a parameter that was offloaded but whose data was since replaced."""
    record = _placed.get(tensor) if isinstance(tensor, nn.Parameter) else None
    return record if record is not None and lookup(tensor) is not record else None


def _resident_deepcopy(self: nn.Parameter, memo: dict) -> nn.Parameter:
    """``copy.deepcopy`` of an offloaded parameter: an ordinary resident one of its original class
    with the same values in memory of its own (the host copy is not shared, nor is the copy
    offloaded). So ``copy.deepcopy(model)`` of an offloaded model is a plain model: compile it,
    or ``offload`` it on its own."""
    if id(self) in memo:
        return memo[id(self)]
    made_classes = [*_offloaded_classes.items(), *_swapped_classes.items()]
    original = next(cls for cls, made in made_classes if made is type(self))
    result = original.__deepcopy__(self, memo)  # type(self)(a clone of the data, requires_grad)
    if type(result) is type(self):
        result.__class__ = original
    memo[id(self)] = result
    return result


class OffloadedParameter(nn.Parameter):
    """The class an offloaded ``nn.Parameter`` takes while offloaded (Dynamo guards on it)."""

    __deepcopy__ = _resident_deepcopy


class SwappedParameter(OffloadedParameter):
    """The class an offloaded ``nn.Parameter`` of a swapped component takes (Dynamo guards on it)."""


_offloaded_classes: dict[type, type] = {nn.Parameter: OffloadedParameter}
_swapped_classes: dict[type, type] = {nn.Parameter: SwappedParameter}


def _offloaded_class(cls: type) -> type:
    if cls in _offloaded_classes.values() or cls in _swapped_classes.values():
        return cls
    return _made_class(cls, _offloaded_classes, "Offloaded", ())


def _swapped_class(cls: type) -> type:
    return _made_class(cls, _swapped_classes, "Swapped", (_offloaded_class(cls),))


def _made_class(cls: type, made_classes: dict[type, type], prefix: str, bases: tuple) -> type:
    if cls not in made_classes:
        # e.g. vLLM's parameter classes; made importable so an offloaded model still pickles
        name = f"{prefix}{cls.__name__}"
        namespace = {"__module__": __name__, "__qualname__": name, "__deepcopy__": _resident_deepcopy}
        made = type(name, bases or (cls,), namespace)
        globals()[name] = made
        made_classes[cls] = made
    return made_classes[cls]


def _forget(key: int, record: HostParameter) -> None:
    """The parameter is gone (its module replaced and dropped): so is its host copy, which a plan
    or a compiled graph's head records would otherwise keep alive."""
    if _records.get(key) is record:
        del _records[key]
    _changes[0] += 1
    # a finalizer may run in the middle of a trace: make a real tensor, not the trace's fake one
    with unset_fake_temporarily():
        record.host = record.host.new_empty(0)
    record.runs = {}


def _host_copy(
    data: torch.Tensor, device: torch.device, pin_memory: bool | None, name: str
) -> tuple[torch.Tensor, bool]:
    pin = _pins(device, pin_memory)
    if device.type == "cpu" and not pin and data.device.type == "cpu" and data.is_contiguous():
        return data, False  # host and device are the same memory: no second copy
    if pin and device.type == "cpu":
        raise ValueError(
            f"pin_memory=True needs an accelerator device, but device is 'cpu' (parameter {name!r}); "
            "pass pin_memory=None or False"
        )
    if pin:
        try:
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
        except RuntimeError as error:
            raise RuntimeError(
                f"could not pin {data.numel() * data.element_size()} bytes of host memory for "
                f"{name!r} ({error}); free host memory or raise the locked-memory limit (ulimit -l)"
            ) from None
    else:
        host = torch.empty(data.shape, dtype=data.dtype)
    host.copy_(data)
    return host, pin


# A pinned slab is at most this large (a power of two), and each tensor in it starts at a multiple
# of _ALIGN bytes.
MAX_SLAB = 1 << 30
_ALIGN = 512


def slab_layout(sizes: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Where tensors of ``sizes`` bytes go in pinned slabs: the slabs' sizes, and per tensor, in the
    order given, (slab, offset). Each slab's size is a power of two, as torch's pinned-memory
    allocator rounds every allocation up to one (one pinned tensor per weight put a Qwen2 layer's
    43 MiB MLP weights in 64 MiB each: 1.43x its bytes). A slab takes the tensors in order while
    they fit (a region's weights stay together), within the largest power of two at or below the
    bytes left (at most ``MAX_SLAB``, at least the first tensor's), and is then cut to the power of two
    above what it holds, or split into one per tensor where those take fewer bytes: never more
    bytes than one allocation per tensor."""
    aligned = list(map(_aligned, sizes))
    slabs: list[int] = []
    places: list[tuple[int, int]] = []
    index = 0
    while index < len(aligned):
        left = sum(aligned[index:])
        size = max(_power_of_two_above(aligned[index]), min(_power_of_two_below(left), MAX_SLAB))
        held, used = [], 0
        while index < len(aligned) and used + aligned[index] <= size:
            held.append(used)
            used += aligned[index]
            index += 1
        alone = [_power_of_two_above(n) for n in aligned[index - len(held) : index]]
        if _power_of_two_above(used) <= sum(alone):
            places += [(len(slabs), offset) for offset in held]
            slabs.append(_power_of_two_above(used))
        else:  # these tensors take fewer bytes one allocation each
            places += [(len(slabs) + i, 0) for i in range(len(held))]
            slabs += alone
    return slabs, places


def runs(hosts: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    """``hosts`` (in the order given) as runs that lie one after another in one allocation (a
    pinned slab), each tensor contiguous and at the first ``_ALIGN``-byte boundary (from the run's
    start) at or after the end of the one before, as ``slab_layout`` puts them: per run, (index of
    its first tensor, how many, its bytes). A run is copied as one piece (``host_runs``) into
    device buffers laid out the same way (``packed_offsets``); tensors in separate allocations, or
    out of order, are runs of one."""
    found: list[list[int]] = []
    for index, host in enumerate(hosts):
        if found and _follows(hosts[found[-1][0]], hosts[index - 1], host):
            found[-1][1] += 1
        else:
            found.append([index, 1])
    ends = [host.data_ptr() + host.nbytes for host in hosts]
    return [(first, count, ends[first + count - 1] - hosts[first].data_ptr()) for first, count in found]


def _follows(first: torch.Tensor, before: torch.Tensor, host: torch.Tensor) -> bool:
    """Whether ``host`` starts in the allocation of ``before`` at the first ``_ALIGN`` boundary
    (counted from ``first``, its run's start) at or after ``before``'s end."""
    end = before.data_ptr() + before.nbytes - first.data_ptr()
    return (
        host.data_ptr() - first.data_ptr() == _aligned(end)
        and before.is_contiguous()
        and host.is_contiguous()
        and host.untyped_storage().data_ptr() == before.untyped_storage().data_ptr()
    )


def packed_offsets(nbytes: list[int]) -> tuple[list[int], int]:
    """Where tensors of ``nbytes`` bytes lie in one device tensor laid out as a slab holds them one
    after another (each at the next ``_ALIGN`` boundary): their offsets and its bytes. Any run of
    their host copies (``runs``) then lies as its buffers do, whichever slab it is in."""
    offsets, end = [], 0
    for size in nbytes:
        offsets.append(_aligned(end))
        end = offsets[-1] + size
    return offsets, end


def host_runs(records: list[HostParameter]) -> list[tuple[int, int, torch.Tensor]]:
    """``records``' host copies as ``runs``, each with the host tensor that one copy reads: a run of
    one's host copy, a longer run's bytes as a uint8 view of its allocation. Kept by the first
    record, keyed by the host addresses: it goes with the record's host copy (``unplace``)."""
    hosts = [record.host for record in records]
    key = tuple(map(torch.Tensor.data_ptr, hosts))
    found = records[0].runs.get(key)
    if found is None:
        found = []
        for first, count, nbytes in runs(hosts):
            host = hosts[first]
            found.append((first, count, bytes_from(host, nbytes) if count > 1 else host))
        records[0].runs[key] = found
    return found


def bytes_from(host: torch.Tensor, nbytes: int) -> torch.Tensor:
    """``nbytes`` bytes of ``host``'s allocation from where ``host`` starts, as a uint8 tensor (a run
    of host copies, copied as one piece)."""
    storage = host.untyped_storage()
    view = torch.empty(0, dtype=torch.uint8, device=host.device)
    return view.set_(storage, host.data_ptr() - storage.data_ptr(), (nbytes,))


def _aligned(n: int) -> int:
    """``n`` bytes rounded up to the next ``_ALIGN`` boundary: where a slab puts the tensor after
    ``n`` bytes (``slab_layout``), so also where ``runs`` looks for it and ``packed_offsets`` puts it."""
    return -(-n // _ALIGN) * _ALIGN


def _power_of_two_above(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _power_of_two_below(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 1


def _pinned_hosts(params: list[nn.Parameter], device: torch.device, pin_memory: bool | None) -> dict:
    """id(param) -> its place in a pinned slab (``slab_layout``), for each of ``params`` that is
    pinned (on a CUDA device) and not empty: an empty tensor's address would be the next one's."""
    chosen = [param for param in params if param.numel()] if _pins(device, pin_memory) else []
    if not chosen or device.type != "cuda":
        return {}  # (pin_memory=True with device cpu: _host_copy names the fault)
    try:
        return slab_hosts(chosen, _allocate_slab)
    except RuntimeError as error:
        nbytes = sum(slab_layout([param.data.nbytes for param in chosen])[0])
        raise RuntimeError(
            f"could not pin {nbytes} bytes of host memory for {len(chosen)} parameters ({error}); "
            "free host memory or raise the locked-memory limit (ulimit -l)"
        ) from None


def slab_hosts(params: list[nn.Parameter], allocate) -> dict:
    """id(param) -> its place (unfilled) in the slabs of ``slab_layout``, each slab made by
    ``allocate(nbytes)`` as a uint8 tensor."""
    slabs, places = slab_layout([param.data.nbytes for param in params])
    memory = [allocate(size) for size in slabs]
    hosts = {}
    for param, (slab, offset) in zip(params, places):
        data = param.data
        hosts[id(param)] = memory[slab][offset : offset + data.nbytes].view(data.dtype).view(data.shape)
    return hosts


def _pins(device: torch.device, pin_memory: bool | None) -> bool:
    """Whether host copies for ``device`` are pinned: ``pin_memory``, or where the device needs it."""
    return device.type != "cpu" if pin_memory is None else pin_memory


def _allocate_slab(size: int) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8, pin_memory=True)


def _device_alias(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor typed on ``device`` that reads and writes ``host``'s memory."""
    if device.type == "cpu":
        return host
    if device.type != "cuda":
        raise ValueError(f"device {str(device)!r} is not supported; use 'cuda' or 'cpu'")
    flat = host.reshape(-1).view(torch.uint8)  # bfloat16 has no array-interface type string

    class _Interface:
        # torch keeps this object (and with it `host`) alive as long as the alias's storage lives
        keep = host
        __cuda_array_interface__ = {
            "shape": (flat.numel(),),
            "typestr": "|u1",
            "data": (flat.data_ptr(), False),
            "version": 3,
            "strides": None,
        }

    alias = torch.as_tensor(_Interface(), device=device)
    return alias.view(host.dtype).view(host.shape)


# id(module) -> module, for every module whose calls are regions (matched ones and descendants)
_region_modules: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def mark_region_module(module: nn.Module) -> None:
    _region_modules[id(module)] = module


def unmark_region_module(module: nn.Module) -> None:
    _region_modules.pop(id(module), None)


def is_region_module(module_key: str) -> bool:
    """Whether an ``nn_module_stack`` key (``str(id(module))``, maybe with ``@n``) is offloaded."""
    ident = module_key.split("@")[0]
    return ident.isdigit() and int(ident) in _region_modules


def adopt(param: nn.Parameter, host: torch.Tensor, names: tuple[str, ...]) -> HostParameter:
    """Register a parameter whose data already is a device-typed alias of pinned ``host``."""
    record = HostParameter(names, host, param.device, True, weakref.ref(param))
    key = param.data.data_ptr()
    _records[key] = record
    _changes[0] += 1
    weakref.finalize(param, _forget, key, record)
    return record
