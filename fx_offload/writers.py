"""Writes to offloaded parameters that bypass the version counter, made visible.

Every copy of an offloaded parameter that outlives a call (a head region's persistent buffer, a
swapped component's device range) is refreshed when the parameter's version counter moved since
it was copied. PyTorch's in-place ops move it; a kernel that writes through a raw pointer does
not. The writers PyTorch ships of that kind are the fused optimizers: the autograd kernels of
``aten::_fused_adamw_``, ``_fused_adam_``, ``_fused_sgd_`` and ``_fused_adagrad_`` leave the
version counter alone (those of the ``_foreach_`` ops move it), so ``AdamW(fused=True).step()``
leaves ``p._version`` as it was. The autograd kernel runs before the device kernel is chosen, so
this holds on every device.

An optimizer step post-hook, registered for every ``torch.optim.Optimizer`` once this module is
imported, bumps the version counters of the offloaded parameters with a gradient that the
optimizer holds, after each step. It costs a dictionary lookup per parameter, and nothing while
no parameter is offloaded.

Writes that remain unseen are listed in the README's Guarantees: ``p.data`` writes, and writes
through a NumPy view or a DLPack capsule, into a parameter that a head or a swapped component
holds.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

from fx_offload import placement


def written_by_step(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The offloaded parameters that ``optimizer`` holds and may have written: those with a
    gradient (every ``torch.optim`` step skips the others)."""
    if not placement.any_placed():
        return []
    return [
        param
        for group in optimizer.param_groups
        for param in group["params"]
        if param.grad is not None and placement.lookup(param.data) is not None
    ]


def _after_step(optimizer: torch.optim.Optimizer, _args, _kwargs) -> None:
    params = written_by_step(optimizer)
    if params:
        increment_version(params)


# kept for the process's life: the hook is what makes fused optimizers safe to use
_STEP_HOOK = register_optimizer_step_post_hook(_after_step)
