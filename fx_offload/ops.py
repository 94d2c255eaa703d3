"""The ``fx_offload`` custom ops that the rewritten graph calls, with their fake kernels.

``fetch(weights, after, region) -> buffers``: start the host-to-device copies of one region's
    parameters; ``after`` holds release tokens the fetch must follow (memory is reused in order).
``wait(buffers, issued, region)``: join the copies before the first reader. It declares that it
    writes ``buffers``, so readers stay after it; ``issued`` holds later fetches that must be
    started before this region computes (that is the prefetch).
``release(buffers, readers, region) -> token``: the readers are done. ``readers`` are their
    outputs: a data edge, because Inductor realizes a lazy reader (a gather, a pointwise op) only
    when something needs it, possibly after a mutation. It declares that it writes ``buffers``
    (their contents are undefined afterwards), which also keeps it out of dead-code elimination.
``head(weights, region) -> buffers``: the first region's weights, already on the device: persistent
    buffers that the previous call refilled (or the compiled function's wrapper filled).
``refill(buffers, weights, after, region)``: start copying ``weights`` into the head ``buffers``
    for the next call, late in this one, so that copy overlaps this call's tail; a ``wait`` at the
    end of the graph joins it.
``swapped(weights, component) -> buffers``: the fixed device copies of a swapped component's
    weights (``fx_offload.swap``), which the compiled function's wrapper put there before the call.
``hold(buffers, readers, component)``: at the end of the graph, keeps those copies alive to the
    end, so that Inductor never reuses their memory for a later buffer (they persist across calls).

Ordering is carried by data edges and declared mutations only, so no scheduler may move a node
past what it guards.
"""

from __future__ import annotations

import torch

from fx_offload import runtime


@torch.library.custom_op("fx_offload::fetch", mutates_args=())
def fetch(weights: list[torch.Tensor], after: list[torch.Tensor], region: str) -> list[torch.Tensor]:
    return runtime.fetch(weights, region)


def _like(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]


@fetch.register_fake
def _(weights, after, region):
    return _like(weights)


@torch.library.custom_op("fx_offload::wait", mutates_args=("fetched",))
def wait(fetched: list[torch.Tensor], issued: list[torch.Tensor], region: str) -> None:
    runtime.wait(fetched)


@wait.register_fake
def _(fetched, issued, region):
    return None


@torch.library.custom_op("fx_offload::release", mutates_args=("fetched",))
def release(fetched: list[torch.Tensor], readers: list[torch.Tensor], region: str) -> torch.Tensor:
    return runtime.release(fetched)


@release.register_fake
def _(fetched, readers, region):
    device = fetched[0].device if fetched else torch.device("cpu")
    return torch.empty(0, device=device)


@torch.library.custom_op("fx_offload::head", mutates_args=())
def head(weights: list[torch.Tensor], region: str) -> list[torch.Tensor]:
    return runtime.head(weights)


@head.register_fake
def _(weights, region):
    return _like(weights)


@torch.library.custom_op("fx_offload::refill", mutates_args=("buffers",))
def refill(
    buffers: list[torch.Tensor], weights: list[torch.Tensor], after: list[torch.Tensor], region: str
) -> None:
    runtime.refill(buffers, weights)


@refill.register_fake
def _(buffers, weights, after, region):
    return None


@torch.library.custom_op("fx_offload::swapped", mutates_args=())
def swapped(weights: list[torch.Tensor], component: str) -> list[torch.Tensor]:
    return runtime.swapped(weights)


@swapped.register_fake
def _(weights, component):
    return _like(weights)


@torch.library.custom_op("fx_offload::hold", mutates_args=("buffers",))
def hold(buffers: list[torch.Tensor], readers: list[torch.Tensor], component: str) -> None:
    pass


@hold.register_fake
def _(buffers, readers, component):
    return None


FETCH = torch.ops.fx_offload.fetch.default
WAIT = torch.ops.fx_offload.wait.default
RELEASE = torch.ops.fx_offload.release.default
HEAD = torch.ops.fx_offload.head.default
REFILL = torch.ops.fx_offload.refill.default
SWAPPED = torch.ops.fx_offload.swapped.default
HOLD = torch.ops.fx_offload.hold.default
