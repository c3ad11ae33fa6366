"""Low-precision helpers: stochastic rounding of float32 results into bfloat16 parameters.

Rounding ``x`` to bfloat16 stochastically rounds up with probability equal to the distance
from the lower neighbour (in units of the bfloat16 spacing), so ``E[round(x)] = x``: small
updates are not lost to round-to-nearest. Reference: Zamirai et al., "Revisiting BFloat16
Training", https://arxiv.org/abs/2010.06192; the bit trick is described in
https://github.com/pytorch/pytorch/issues/120376.
"""

from __future__ import annotations

import torch

from funcopt.base import (
    Params,
    Tensor,
    Updates,
    tree_flatten_pair,
    tree_unflatten,
)

__all__ = ["stochastic_round_bf16", "apply_updates_stochastic"]


def stochastic_round_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round float32 ``x`` to bfloat16, unbiased: add 16 random low bits, then truncate.

    With ``x``'s bits ``b`` (int32), the result is the upper half of ``b + r``,
    ``r ~ U{0, ..., 2^16 - 1}``: it rounds away from zero with probability ``frac``, the
    discarded fraction of the mantissa. ``generator`` fixes the draws (same generator state,
    same result). Non-finite values are rounded to nearest.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 needs a float32 tensor, got {x.dtype}; "
                        "compute the result in float32 first (x.float())")
    r = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device)
    bits = (x.view(torch.int32) + r) & -65536
    out = bits.view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))


def apply_updates_stochastic(params: Params, updates: Updates,
                             generator: torch.Generator | None = None) -> Params:
    """``params + updates`` with the sum taken in float32 and stochastically rounded into
    bfloat16 parameters (other dtypes: the plain sum in the parameter's dtype).

    Args: ``params`` (tree), ``updates`` (same structure, any float dtype), ``generator``
    (``torch.Generator`` on the parameters' device for reproducible draws; default: the global
    one). Pure: new tensors are returned.
    """
    u_leaves, treedef, p_leaves = tree_flatten_pair(updates, params)
    out = []
    for p, u in zip(p_leaves, u_leaves):
        if p.dtype == torch.bfloat16:
            out.append(stochastic_round_bf16(p.float() + u.float(), generator))
        else:
            out.append(p + u.to(p.dtype))
    return tree_unflatten(treedef, out)
