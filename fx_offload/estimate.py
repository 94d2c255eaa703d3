"""How long a graph computes after its last fetch, and how many bytes the copy engine moves then.

The heads' refill for the next call (``rewrite._serve_head``) is best copied by the graph itself
during its tail, the compute after its last fetched region's wait, when the copy engine would
otherwise idle: bytes copied there cost nothing, while bytes left after the call delay the next
call where calls come back to back, and bytes past the tail make the call end late where the
caller waits between calls (docs/design.md). ``tail_bytes`` sizes that part: the
tail's time by a roofline of its FLOP-counted ops (FLOPs at the device's measured matmul rate,
bytes read and written at its memory rate, and a launch each), times the host-to-device
bandwidth, doubled (a short estimate leaves the copy engine idle in the tail, a long one only
ends the call later by the excess). The device's figures are measured once (a matmul, a device
copy, a pinned copy); where there are none (a CPU), the caller copies the whole heads in the call.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import has_free_symbols
from torch.utils.flop_counter import flop_registry

try:  # a symbol's size hint, without a guard (torch 2.13 renamed it)
    from torch.fx.experimental.symbolic_shapes import optimization_hint as hint_int
except ImportError:
    from torch.fx.experimental.symbolic_shapes import hint_int

# What a kernel costs beyond its roofline inside a CUDA graph (launch and tail effects), seconds.
KERNEL_OVERHEAD_S = 3e-6
# The estimate is doubled: too short costs copy time one for one, too long costs only past the
# heads' share of the gap between calls.
MARGIN = 2.0


@dataclass(frozen=True)
class DeviceFigures:
    """Peak rates of a device: FLOP/s (per dtype), device memory and host-to-device bytes/s."""

    flops: dict[torch.dtype, float]
    memory_bytes_per_s: float
    h2d_bytes_per_s: float


def tail_seconds(nodes: Iterable[fx.Node], figures: DeviceFigures) -> float:
    """Roofline time of the FLOP-counted ops among ``nodes`` (post-grad nodes with ``val``s)."""
    total = 0.0
    for node in nodes:
        packet = getattr(node.target, "overloadpacket", None)
        formula = flop_registry.get(packet) if packet is not None else None
        if node.op != "call_function" or formula is None:
            continue
        args, kwargs, out = torch.fx.node.map_aggregate(
            (node.args, node.kwargs, node),
            lambda a: _hinted(a.meta.get("val") if isinstance(a, fx.Node) else a),
        )
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not isinstance(out, torch.Tensor) or not tensors:
            continue
        try:
            flops = formula(*args, **kwargs, out_val=out)
        except Exception:  # a formula that wants more than shapes: count its memory only
            flops = 0
        peak = figures.flops.get(out.dtype) or max(figures.flops.values(), default=0.0)
        compute = flops / peak if peak else 0.0
        memory = sum(t.nbytes for t in tensors) / figures.memory_bytes_per_s
        total += max(compute, memory) + KERNEL_OVERHEAD_S
    return total


def _hinted(value):
    """``value`` at the sizes of the call that compiled its graph: in a graph compiled for dynamic
    shapes a size is a symbol, which neither a byte count nor a FLOP formula may read without
    guarding on it; a tensor with symbolic sizes becomes a meta tensor of its hinted sizes."""
    from torch._inductor import config as inductor_config

    fallback = inductor_config.unbacked_symint_fallback  # a data-dependent size: Inductor's guess
    if isinstance(value, torch.SymInt):
        return hint_int(value, fallback=fallback)
    if isinstance(value, torch.Tensor) and has_free_symbols(value):
        shape = [hint_int(size, fallback=fallback) for size in value.shape]
        return torch.empty(shape, dtype=value.dtype, device="meta")
    return value


def tail_bytes(nodes: Iterable[fx.Node], figures: DeviceFigures) -> int:
    """Bytes to copy during the compute of ``nodes``: their time, doubled, at the host-to-device
    bandwidth."""
    return int(MARGIN * tail_seconds(nodes, figures) * figures.h2d_bytes_per_s)


def device_figures(device_type: str) -> DeviceFigures | None:
    """The current ``device_type`` device's figures, or None where it has none (not CUDA, or
    measuring failed)."""
    if device_type != "cuda" or not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
        return None  # (timing needs syncs, which a CUDA graph capture forbids)
    return _cuda_figures(torch.cuda.current_device())


@functools.cache
def _cuda_figures(index: int) -> DeviceFigures | None:
    """Measured once per device (0.63 s on an H100, cuBLAS's start included; at most 0.2 GB of
    device memory at once, the fp32 matmul's three 64 MiB tensors, back to the caching allocator
    after, but counted by ``max_memory_allocated``): a bf16 and an fp32 4096-square matmul,
    a 64 MiB device copy and a 32 MiB pinned host-to-device copy, each the best of three.
    Measured rather than looked up: Inductor's peak-FLOPs helper gave 0.535 for an H100 on torch
    2.11 (units differ between versions), and a tail computes at what matmuls reach, not at a
    datasheet's peak."""
    device = torch.device("cuda", index)
    try:  # real tensors, whatever tensor mode the caller runs under
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.cuda.device(index):
            flops = {dtype: _matmul_flops_per_s(device, dtype) for dtype in (torch.bfloat16, torch.float32)}
            flops[torch.float16] = flops[torch.bfloat16]
            memory = _copy_bytes_per_s(torch.empty(64 << 20, dtype=torch.uint8, device=device))
            h2d = _copy_bytes_per_s(torch.empty(32 << 20, dtype=torch.uint8, pin_memory=True), device)
    except Exception:  # no figures: the caller copies the whole heads in the call
        return None
    return DeviceFigures(flops, memory, h2d)


def _best_of_three(run) -> float:
    """The shortest of three timed ``run()``s on a side stream, in seconds."""
    stream, best = torch.cuda.Stream(), float("inf")
    with torch.cuda.stream(stream):
        run()  # warm-up (cuBLAS handle, kernel selection)
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            run()
            end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    return best


def _matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 4096) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _best_of_three(lambda: torch.mm(a, b))


def _copy_bytes_per_s(source: torch.Tensor, device: torch.device | None = None) -> float:
    """Bytes per second of copying ``source`` to ``device`` (a device buffer: read and write)."""
    target = torch.empty_like(source, device=device or source.device)
    seconds = _best_of_three(lambda: target.copy_(source, non_blocking=True))
    return source.nbytes * (1 if device is not None else 2) / seconds
