"""What fetch, wait and release do on a device: the copy stream, its events, fresh buffers.

``fetch`` allocates device buffers on the compute stream (so their addresses come from the
caching allocator, or from the CUDA graph's private pool while one is captured), makes the copy
stream wait for the compute stream (the buffers may reuse memory that queued kernels still read),
and copies the pinned host tensors on the copy stream. ``wait`` makes the compute stream wait for
those copies. ``release`` ends the buffers' life; with ``poison_released`` it overwrites them, so
a reader scheduled after its release reads NaN instead of passing by luck.

Every stream fork and join of one forward happens inside that forward, so a captured CUDA graph
contains both ends of each copy.
"""

from __future__ import annotations

import torch

from fx_offload import placement

#: Debug switch: fill released buffers with NaN (or the dtype's max) to expose late readers.
poison_released = False

_copy_streams: dict[torch.device, torch.cuda.Stream] = {}
# data_ptr of a fetched buffer -> the event its copies end with
_inflight: dict[int, torch.cuda.Event] = {}


def fetch(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Start copying the host values of ``weights`` into fresh device buffers."""
    hosts = [_host_of(weight) for weight in weights]
    buffers = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    if not buffers:
        return buffers
    device = buffers[0].device
    if device.type != "cuda":
        for buffer, host in zip(buffers, hosts):
            buffer.copy_(host)
        return buffers
    compute = torch.cuda.current_stream(device)
    copy = _copy_stream(device)
    copy.wait_stream(compute)
    with torch.cuda.stream(copy):
        for buffer, host in zip(buffers, hosts):
            buffer.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(copy)
    _inflight[buffers[0].data_ptr()] = done
    return buffers


def wait(fetched: list[torch.Tensor]) -> None:
    """Make the compute stream wait until ``fetched`` holds its values."""
    if not fetched or fetched[0].device.type != "cuda":
        return
    done = _inflight.pop(fetched[0].data_ptr(), None)
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


def _host_of(weight: torch.Tensor) -> torch.Tensor:
    record = placement.lookup(weight)
    if record is None:
        raise RuntimeError(
            f"fx_offload.fetch got a {tuple(weight.shape)} {weight.dtype} tensor that is not an "
            "offloaded parameter: its data was replaced after offload (model.to(), .half(), "
            "load_state_dict(assign=True), a new submodule?). Call fx_offload.restore(model), "
            "then offload and compile again"
        )
    return record.host


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device=device)
    return _copy_streams[device]
