"""Per-sample gradients and the cheap per-sample statistics of adaptive batch-size tests.

Notation (one batch of b samples, per-sample losses l_i, parameters w):

    g_i = grad l_i(w)          per-sample gradient
    g   = (1/b) sum_i g_i      mean (batch) gradient
    S2  = sum_i ||g_i||^2      sum of squared per-sample gradient norms
    p_i = <g_i, v>             per-sample inner product with a direction v (v = g for the tests)

:func:`per_sample_grads` materialises every g_i with ``vmap(grad)``: the reference path.
:func:`batch_grad_and_sq_norms` gets g and every ||g_i||^2 from one forward and one backward
pass without forming any g_i for ``nn.Linear`` and ``nn.Conv2d`` layers (for one token,
||g_i||^2 = ||delta_i||^2 ||a_i||^2 for a weight gradient delta_i a_i^T; for T tokens the Gram
identity ||sum_t delta_it a_it^T||^2 = sum_{t,s} (delta_it . delta_is)(a_it . a_is));
other layers fall back to ``vmap(grad)`` over their own parameters only.
:func:`per_sample_inner_products` gets every p_i from one forward-mode pass: p_i is the
directional derivative of l_i along v (``jvp``), so no g_i is formed for any layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from funcopt.base import PyTree, tree_flatten, tree_leaves, tree_unflatten
from funcopt.engine import ops

__all__ = [
    "PerSampleStats",
    "per_sample_grads",
    "per_sample_inner_products",
    "sample_loss",
    "batch_grad_and_sq_norms",
    "stats_from_per_sample_grads",
    "finalize_stats",
]

Tensor = torch.Tensor


class PerSampleStats(NamedTuple):
    """Sufficient statistics of one batch for the norm and inner-product tests.

    All fields are 0-d tensors and all but ``grad_sq_norm`` are plain sums over samples, so
    they add across micro-batches and all-reduce (sum) across data-parallel ranks.

    count: b, the number of samples. grad_sq_norm: ||g||^2 of the mean gradient.
    sum_sq_norms: S2 = sum_i ||g_i||^2. sum_inner: sum_i <g_i, g>. sum_sq_inner: sum_i <g_i, g>^2
    (the last two are ``None`` when inner products were not computed).
    """

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count by design (optax's name)
    grad_sq_norm: Tensor
    sum_sq_norms: Tensor
    sum_inner: Tensor | None = None
    sum_sq_inner: Tensor | None = None


def _check_in_dims(in_dims: Sequence[Any], who: str) -> None:
    if not isinstance(in_dims, (tuple, list)) or not in_dims or in_dims[0] is not None:
        raise ValueError(
            f"{who}: in_dims={in_dims!r} must be a tuple whose first entry is None (the "
            "parameters are shared by all samples), e.g. in_dims=(None, 0, 0)"
        )


def per_sample_grads(
    loss_fn: Callable[..., Tensor], in_dims: Sequence[Any] = (None, 0, 0),
    chunk_size: int | None = None,
) -> Callable[..., PyTree]:
    """``vmap(grad(loss_fn))``: every sample's gradient, with a leading batch dimension.

    g_i = grad_w l(w, x_i, y_i) for i = 1..b, where ``loss_fn(params, x, y)`` is the loss of
    one sample (w = ``params``, the first argument; x_i, y_i the batched arguments).

    Args:
        loss_fn: ``loss_fn(params, *args) -> 0-d tensor``, the loss of ONE sample; params is any
            pytree of tensors.
        in_dims: vmap's in_dims over loss_fn's arguments; the first (params) must be None.
            Default (None, 0, 0).
        chunk_size: run vmap over at most this many samples at a time to bound memory
            (default None: all at once).

    Returns:
        A function with loss_fn's arguments that returns the params pytree with a leading
        dimension of size b on every leaf.

    Reference: torch.func per-sample-gradient recipe; AdAdaGrad (Lau, Liu, Kolar 2024,
    arXiv 2402.11215) computes its tests from these.
    """
    _check_in_dims(in_dims, "per_sample_grads")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int or None")
    return vmap(grad(loss_fn), in_dims=tuple(in_dims), chunk_size=chunk_size)


def per_sample_inner_products(
    loss_fn: Callable[..., Tensor], in_dims: Sequence[Any] = (None, 0, 0),
    chunk_size: int | None = None,
) -> Callable[..., Tensor]:
    """p_i = <grad_w l(w, x_i, y_i), v> for every sample, by forward mode (no g_i is formed).

    p_i is the derivative of l_i(w + eps v) at eps = 0, so one ``jvp`` of the vector of
    per-sample losses gives all of them at the cost of about two forward passes.

    Args:
        loss_fn: the loss of ONE sample, ``loss_fn(params, *args)``, as for
            :func:`per_sample_grads`.
        in_dims: vmap's in_dims over loss_fn's arguments; the first must be None.
        chunk_size: samples per vmap chunk (default None: all at once).

    Returns:
        ``fn(direction, params, *args) -> tensor of shape (b,)`` where ``direction`` (v) has
        the structure of params.
    """
    _check_in_dims(in_dims, "per_sample_inner_products")
    batched = vmap(loss_fn, in_dims=tuple(in_dims), chunk_size=chunk_size)

    def inner(direction: PyTree, params: PyTree, *args: Any) -> Tensor:
        return jvp(lambda p: batched(p, *args), (params,), (direction,))[1]

    return inner


def sample_loss(model: nn.Module, output_loss: Callable[[Tensor, Tensor], Tensor]
                ) -> Callable[[PyTree, Tensor, Tensor], Tensor]:
    """The one-sample loss ``loss_fn(params, x, y)`` of a model and a per-sample output loss.

    ``output_loss(outputs, targets)`` must return one loss per sample (e.g.
    ``F.cross_entropy(..., reduction="none")``); x and y are single samples (no batch dim).
    """

    def loss_fn(params: PyTree, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, params, (x.unsqueeze(0),))
        return output_loss(out, y.unsqueeze(0)).sum()

    return loss_fn


# --------------------------------------------------------------------------- fast norms


def _conv_ok(m: nn.Conv2d) -> bool:
    return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _tokens(module: nn.Module, a: Tensor, dz: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs a and output gradients dz as (b, T, d_in) and (b, T, d_out)."""
    b = a.shape[0]
    if isinstance(module, nn.Conv2d):
        assert not isinstance(module.padding, str)  # string padding is refused by _conv_ok
        a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
        return a.transpose(1, 2), dz.reshape(b, dz.shape[1], -1).transpose(1, 2)
    return a.reshape(b, -1, a.shape[-1]), dz.reshape(b, -1, dz.shape[-1])


def _layer_terms(module: nn.Module, a: Tensor, dz: Tensor, norms: list, squares: list) -> None:
    """Append one Linear/Conv2d call's per-sample terms: ||dW_i||^2 + ||db_i||^2 is the sum of
    the squares of what goes to ``norms`` plus what goes to ``squares`` (all shaped (b,))."""
    bias = module.bias is not None
    if a.dim() == 2 and isinstance(module, nn.Linear):  # one token: ||dW_i|| = ||dz_i|| ||a_i||
        dz_norm = torch.linalg.vector_norm(dz, dim=1)
        norms.append(dz_norm * torch.linalg.vector_norm(a, dim=1))
        if bias:
            norms.append(dz_norm)
        return
    a, dz = _tokens(module, a, dz)
    t, d_in, d_out = a.shape[1], a.shape[2], dz.shape[2]
    if t * t <= d_in * d_out:  # Gram identity: cost b T^2 (d_in + d_out)
        squares.append(((dz @ dz.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2)))
    else:  # forming dW_i is cheaper: cost b T d_in d_out
        norms.append(torch.linalg.vector_norm(dz.transpose(1, 2) @ a, dim=(1, 2)))
    if bias:
        norms.append(torch.linalg.vector_norm(dz.sum(1), dim=1))


_LAYER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hook_layers(model: nn.Module, params: dict[str, Tensor]) -> dict[nn.Module, list[str]]:
    """Modules whose per-sample norms have a closed form, and the param names they own.

    Cached per model and parameter names; a stale entry is harmless, since a layer's
    parameters count as covered only when the layer was seen in this forward pass.
    """
    names = tuple(params)
    per_model = _LAYER_CACHE.setdefault(model, {})
    if names in per_model:
        return per_model[names]
    layers = {}
    for name, m in model.named_modules():
        ok = isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and _conv_ok(m))
        if not ok:
            continue
        prefix = f"{name}." if name else ""
        keys = [prefix + "weight"] + ([prefix + "bias"] if m.bias is not None else [])
        if all(k in params for k in keys):
            layers[m] = keys
    per_model[names] = layers
    return layers


def _forward_backward(
    model: nn.Module, output_loss: Callable[[Tensor, Tensor], Tensor], leaves: dict[str, Tensor],
    inputs: Tensor, targets: Tensor, layers: dict[nn.Module, list[str]],
) -> tuple[Tensor, tuple[Tensor, ...], list[tuple[nn.Module, Tensor, Tensor]]]:
    """Losses, gradients of the leaves, and (module, a, dz) of every layer called once
    (a gradient is None where its tensor does not reach the loss)."""
    seen: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in layers}

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        seen[mod].append((inp[0], out))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            losses = output_loss(functional_call(model, leaves, (inputs,)), targets)
    finally:
        for h in handles:
            h.remove()
    if losses.shape != (inputs.shape[0],):
        raise ValueError(f"output_loss must return one loss per sample, shape "
                         f"({inputs.shape[0]},); got {tuple(losses.shape)}. Use reduction='none'")
    used = [(m, c[0][0], c[0][1]) for m, c in seen.items() if len(c) == 1 and c[0][1].requires_grad]
    leaf_list = list(leaves.values())
    grads = torch.autograd.grad(losses.sum(), leaf_list + [o for _, _, o in used],
                                allow_unused=True)
    n = len(leaf_list)
    return losses.detach(), grads[:n], [(m, a, dz) for (m, a, _), dz in zip(used, grads[n:])]


def batch_grad_and_sq_norms(
    model: nn.Module, output_loss: Callable[[Tensor, Tensor], Tensor],
    params: dict[str, Tensor], inputs: Tensor, targets: Tensor, chunk_size: int | None = None,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The summed gradient sum_i g_i, every ||g_i||^2 and every l_i from one backward pass.

    For ``nn.Linear`` and ``nn.Conv2d`` (groups=1, numeric zero padding) layers called once per
    forward, ||g_i||^2 comes from the layer inputs and output gradients (see the module
    docstring) without forming g_i; the parameters of any other layer get theirs from
    ``vmap(grad)`` restricted to those parameters. The model must treat samples independently
    (no BatchNorm in training mode). Beyond the batch gradient, a Linear layer on (b, d) inputs
    costs two row norms and a product.

    Args:
        model: the module; its parameters are replaced by ``params`` (torch.func.functional_call).
        output_loss: ``output_loss(outputs, targets) -> (b,)`` per-sample losses l_i.
        params: dict name -> tensor, as ``dict(model.named_parameters())`` (detached is fine).
        inputs, targets: the batch, leading dimension b.
        chunk_size: vmap chunk size for the fallback layers (default None).

    Returns:
        ``(grad_sum, sq_norms, losses)``: dict of sum_i g_i, tensor (b,) of ||g_i||^2 and
        tensor (b,) of l_i.
    """
    if not isinstance(params, dict):
        raise TypeError("batch_grad_and_sq_norms needs params as a dict name -> tensor, "
                        "e.g. {k: v.detach() for k, v in model.named_parameters()}")
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    layers = _hook_layers(model, params)
    losses, grads, calls = _forward_backward(model, output_loss, leaves, inputs, targets, layers)
    grad_sum = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(leaves, grads)}
    norms: list[Tensor] = []
    squares: list[Tensor] = []
    covered: set[str] = set()
    with torch.no_grad():
        for m, a, dz in calls:
            if dz is not None:
                _layer_terms(m, a, dz, norms, squares)
                covered.update(layers[m])
        sq = torch.stack(norms).square().sum(0) if norms else torch.zeros_like(losses)
        for term in squares:
            sq = sq + term
    rest = {k: v.detach() for k, v in params.items() if k not in covered}
    if rest:
        sq = sq + _fallback_sq_norms(model, output_loss, params, rest, inputs, targets, chunk_size)
    return grad_sum, sq, losses


def _fallback_sq_norms(model, output_loss, params, rest, inputs, targets, chunk_size):
    fixed = {k: v.detach() for k, v in params.items()}

    def one(sub, x, y):
        out = functional_call(model, {**fixed, **sub}, (x.unsqueeze(0),))
        return output_loss(out, y.unsqueeze(0)).sum()

    g = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)(rest, inputs, targets)
    return sum(leaf.flatten(1).square().sum(1) for leaf in tree_leaves(g))


# --------------------------------------------------------------------------- statistics


def _flat(per_sample: PyTree) -> Tensor:
    leaves = tree_leaves(per_sample)
    if not leaves:
        raise ValueError("per-sample gradients are empty; pass a pytree with at least one leaf")
    return torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], dim=1)


def stats_from_per_sample_grads(
    per_sample: PyTree, inner: bool = True
) -> tuple[PyTree, PerSampleStats]:
    """Mean gradient and :class:`PerSampleStats` from materialised per-sample gradients.

    The reference path: g = mean_i g_i, S2 = sum_i ||g_i||^2, p_i = <g_i, g>.

    Args:
        per_sample: pytree of per-sample gradients (leading dim b), as from
            :func:`per_sample_grads`.
        inner: also compute sum_i p_i and sum_i p_i^2 (default True).
    """
    leaves, treedef = tree_flatten(per_sample)
    flat = _flat(per_sample)
    b = flat.shape[0]
    mean = flat.mean(0)
    g2 = mean.square().sum()
    s2 = flat.square().sum()
    p = flat @ mean if inner else None
    stats = PerSampleStats(
        torch.tensor(float(b), dtype=flat.dtype, device=flat.device), g2, s2,
        None if p is None else p.sum(), None if p is None else p.square().sum())
    return tree_unflatten(treedef, [leaf.mean(0) for leaf in leaves]), stats


def finalize_stats(count: Tensor, grad_sum: PyTree, sum_sq_norms: Tensor,
                   sum_inner: Tensor | None = None, sum_sq_inner: Tensor | None = None
                   ) -> tuple[PyTree, PerSampleStats]:
    """Mean gradient g = grad_sum / count and the :class:`PerSampleStats` with ||g||^2."""
    leaves, treedef = tree_flatten(grad_sum)
    mean = ops.div(leaves, count.to(leaves[0].dtype))
    g2 = torch.stack(ops.norm(mean)).square().sum() if mean else sum_sq_norms * 0
    stats = PerSampleStats(count, g2, sum_sq_norms, sum_inner, sum_sq_inner)
    return tree_unflatten(treedef, mean), stats

