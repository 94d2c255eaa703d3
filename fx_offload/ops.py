"""The ``fx_offload`` custom ops that the rewritten graph calls, with their fake kernels.

``fetch(weights, after, region) -> buffers``: start the host-to-device copies of one region's
    parameters; ``after`` holds release tokens the fetch must follow (memory is reused in order).
``wait(buffers, issued, region)``: join the copies before the first reader. It declares that it
    writes ``buffers``, so readers stay after it; ``issued`` holds later fetches that must be
    started before this region computes (that is the prefetch).
``release(buffers, readers, written, region) -> token``: the readers are done. ``readers`` are
    data edges to the readers' outputs that order every read before it (``rewrite._held``): each
    lazy reader's (a gather, a pointwise op: Inductor computes one only when something needs it),
    and of the extern kernels' (``mm``...), those not computed before another taken. ``written``
    are the buffers a lazy reader reads, so that Inductor keeps any kernel it inlined that read
    into before it, and an empty slot made for it (which keeps it out of dead-code elimination).
    A write declared on every buffer would make Inductor count it as one more user of every
    reader's output, and keep Inductor from overwriting those in place (kernels unlike the
    resident model's, each one more to compile).
``head(weights, region) -> buffers``: a head region's weights, already on the device: persistent
    buffers that the previous call refilled (or the compiled function's wrapper filled).
``refill(buffers, weights, after, slot, region, in_graph=0)``: refill the head ``buffers`` with
    ``weights`` for the next call. Under fx_offload's wrapper it copies the first ``in_graph``
    bytes here, late in the call, and notes that the wrapper issues the rest when the call
    returns (the next call waits for it); without the wrapper (vLLM) it copies everything here.
    ``after`` holds its head's release (every read of ``buffers`` is before it) and the token
    that orders it on the copy stream; it writes ``slot``, not ``buffers``, for the reason
    ``release`` does.
``join(buffers, issued, slot, region)``: at the end of the graph, the compute stream joins what
    the refill of ``buffers`` copied in the graph; ``issued`` (the graph's outputs) keeps it last,
    and writing the refill's ``slot`` keeps it after the refill.
``swapped(weights, component) -> buffers``: the fixed device copies of a swapped component's
    weights (``fx_offload.swap``), which the compiled function's wrapper put there before the call.
``hold(buffers, readers, component)``: at the end of the graph, keeps those copies alive to the
    end, so that Inductor never reuses their memory for a later buffer (they persist across calls).

Ordering is carried by data edges and declared mutations only (of the buffers a ``wait`` makes
ready, of the slots), so no scheduler may move a node past what it guards.

The ops are declared by schema through ``torch.library.Library`` with one
``CompositeExplicitAutograd`` kernel each, rather than through ``torch.library.custom_op``: they
are called on every run of a graph that no CUDA graph replays, and the decorator's Python
autograd and mutation wrappers cost about 16 µs per call against 2.6 µs this way (measured on
the CPU, docs/design.md). They never take part in autograd: the pass rewrites forward graphs only.
"""

from __future__ import annotations

import torch

from fx_offload import runtime

_lib = torch.library.Library("fx_offload", "DEF")  # noqa: TOR901 (kept for the process's life)


def _define(schema: str, kernel, fake) -> None:
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _lib.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fx_offload::{name}", fake, lib=_lib)


def _like(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]


def _token(fetched: list[torch.Tensor]) -> torch.Tensor:
    device = fetched[0].device if fetched else torch.device("cpu")
    return torch.empty(0, device=device)


def _nothing(*_args) -> None:
    return None


_define(
    "fetch(Tensor[] weights, Tensor[] after, str region) -> Tensor[]",
    lambda weights, after, region: runtime.fetch(weights, region),
    lambda weights, after, region: _like(weights),
)
_define(
    "wait(Tensor(a!)[] fetched, Tensor[] issued, str region) -> ()",
    lambda fetched, issued, region: runtime.wait(fetched),
    _nothing,
)
_define(
    "release(Tensor[] fetched, Tensor[] readers, Tensor(a!)[] written, str region) -> Tensor",
    lambda fetched, readers, written, region: runtime.release(fetched),
    lambda fetched, readers, written, region: _token(fetched),
)
_define(
    "head(Tensor[] weights, str region) -> Tensor[]",
    lambda weights, region: runtime.head(weights, region),
    lambda weights, region: _like(weights),
)
_define(
    "refill(Tensor[] buffers, Tensor[] weights, Tensor[] after, Tensor(a!) slot, str region, "
    "int in_graph=0) -> ()",
    lambda buffers, weights, after, slot, region, in_graph=0: runtime.refill(buffers, weights, in_graph),
    _nothing,
)
_define(
    "join(Tensor[] buffers, Tensor[] issued, Tensor(a!) slot, str region) -> ()",
    lambda buffers, issued, slot, region: runtime.wait(buffers),
    _nothing,
)
_define(
    "swapped(Tensor[] weights, str component) -> Tensor[]",
    lambda weights, component: runtime.swapped(weights),
    lambda weights, component: _like(weights),
)
_define(
    "hold(Tensor(a!)[] buffers, Tensor[] readers, str component) -> ()",
    _nothing,
    _nothing,
)

FETCH = torch.ops.fx_offload.fetch.default
WAIT = torch.ops.fx_offload.wait.default
RELEASE = torch.ops.fx_offload.release.default
HEAD = torch.ops.fx_offload.head.default
REFILL = torch.ops.fx_offload.refill.default
JOIN = torch.ops.fx_offload.join.default
SWAPPED = torch.ops.fx_offload.swapped.default
HOLD = torch.ops.fx_offload.hold.default
ALL = (FETCH, WAIT, RELEASE, HEAD, REFILL, JOIN, SWAPPED, HOLD)


def arguments(node) -> dict:
    """The arguments an FX node passes to one of these ops, by their schema names (those left to
    their defaults are absent)."""
    return dict(zip((argument.name for argument in node.target._schema.arguments), node.args))


def lower_in_inductor() -> None:
    """Give Inductor the fallback lowering of each op, with the layout constraint its implicit
    fallback would choose, before it lowers a graph that calls one.

    Without it Inductor takes its implicit-fallback path at an op's first use in the process,
    which logs the op with its arguments; torch 2.11 builds that text at any log level, and an
    argument's text recurses through every IR node it depends on. The ordering tokens tie each
    region to the one before, so on a 36-layer decoder that took minutes."""
    from torch._inductor import lowering
    from torch._library.utils import get_layout_constraint_tag

    for op in ALL:
        if op not in lowering.lowerings:
            tag = get_layout_constraint_tag(op, with_default=True)
            lowering.make_fallback(op, layout_constraint=lowering.tag_to_layout_constraint(tag))
