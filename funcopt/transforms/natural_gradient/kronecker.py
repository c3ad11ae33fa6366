"""What KFAC and SINGD share: the supported layers of a model, a layer's gradient as a
``dim_out x dim_in`` matrix and back, the checks of ``updates`` and ``curvature``, the
average over a process group, the refresh-step read of the counter and the ``fallback``
partition for parameters outside supported layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from funcopt.base import GradientTransformation
from funcopt.engine import is_tracing, leaves
from funcopt.func.capture import LayerSpec, supported_layers

__all__ = ["eye", "cast", "supported", "grad_matrix", "scatter", "check_updates", "curvature_of",
           "all_reduce_mean", "host_count", "refresh_due", "with_fallback"]


def eye(d: int, dtype: torch.dtype, device: Any) -> Tensor:
    """``I_d`` in ``dtype``: built in float32 and cast (torch.eye has no bfloat16 kernel on
    some CPU builds)."""
    return torch.eye(d, dtype=torch.float32, device=device).to(dtype)


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; ``t`` itself when it has it (no dispatch: an eager step calls this
    a dozen times per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


def _shaped(t: Tensor, shape: torch.Size) -> Tensor:
    """``t.reshape(shape)``; ``t`` itself when it has that shape."""
    return t if t.shape == shape else t.reshape(shape)


def supported(model: nn.Module) -> dict[str, LayerSpec]:
    """The model's supported layers by name; TypeError for a non-module, ValueError for none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pass the model (an nn.Module), got {type(model).__name__}")
    layers, _ = supported_layers(model)
    if not layers:
        raise ValueError("the model has no supported layer (Linear, Conv2d with groups=1)")
    return layers


def grad_matrix(updates: dict, spec: LayerSpec) -> Tensor:
    """``[dW, db]`` as a ``dim_out x dim_in`` matrix."""
    w = updates[spec.weight]
    mat = w if w.dim() == 2 else w.reshape(w.shape[0], -1)
    if spec.bias is not None:
        mat = torch.cat([mat, cast(updates[spec.bias].reshape(-1, 1), mat.dtype)], dim=1)
    return mat


def scatter(out: dict, updates: dict, spec: LayerSpec, mat: Tensor) -> None:
    """Write ``mat`` (the layout of :func:`grad_matrix`) into ``out`` in the shapes and dtypes
    of ``updates``."""
    w = updates[spec.weight]
    if spec.bias is not None:
        b = updates[spec.bias]
        out[spec.bias] = cast(_shaped(mat[:, -1], b.shape), b.dtype)
        mat = mat[:, :-1]
    out[spec.weight] = cast(_shaped(mat, w.shape), w.dtype)


def check_updates(updates: Any, layers: dict[str, LayerSpec], who: str,
                  what: str = "updates", params: Any = None) -> None:
    """Refuse ``updates`` that are not a dict of float leaves shaped like ``params`` with an
    entry for every supported layer's weight."""
    if not isinstance(updates, dict):
        raise TypeError(f"{who}: {what} must be a dict keyed like model.named_parameters(), "
                        f"got {type(updates).__name__}; with fo.Optimizer pass "
                        "model.named_parameters() (it then hands the transform such a dict)")
    leaves(updates, params, who)  # float leaves, shaped like params (an error naming the leaf)
    missing = [s.weight for s in layers.values() if updates.get(s.weight) is None]
    if missing:
        raise ValueError(f"{who}: updates have no entry for {missing}; pass gradients for every "
                         "parameter of the model given when the transform was built")


def curvature_of(extra: dict, layers: dict[str, LayerSpec], who: str,
                 traced: bool = False) -> dict:
    """The per-layer statistics of the extra keyword ``curvature`` (a ``Captured`` or its
    ``layers`` dict); ValueError when it is missing or lacks a layer."""
    cur = extra.get("curvature")
    if cur is None and traced:
        raise ValueError(
            f"{who}: under torch.compile or torch.func (vmap ...) the refresh decision is made "
            "on the device, so every step needs "
            "curvature=funcopt.func.capture_curvature(model, params, x, y)")
    if cur is None:
        raise ValueError(f"{who} refreshes its preconditioner on this step and needs "
                         "curvature=funcopt.func.capture_curvature(model, params, x, y)")
    cur = getattr(cur, "layers", cur)
    missing = sorted(set(layers) - set(cur))
    if missing:
        raise ValueError(f"{who}: curvature has no statistics for layers {missing}; capture "
                         "them with funcopt.func.capture_curvature on the same model")
    return cur


def all_reduce_mean(tensors: list[Tensor], group: Any) -> list[Tensor]:
    """Average over the processes of ``group`` (new tensors; inputs untouched)."""
    if group is None:
        return tensors
    import torch.distributed as dist

    out = [t.clone() for t in tensors]
    for t in out:
        dist.all_reduce(t, op=dist.ReduceOp.AVG, group=group)
    return out


def host_count(state_count: Tensor) -> int:
    """The step counter on the host (one sync per step: the refresh decision)."""
    return int(state_count)


def refresh_due(extra: dict, count: Tensor, T: int, who: str) -> bool | Tensor:
    """Whether this step refreshes the preconditioner.

    The extra keyword ``refresh`` (True or False, decided by the caller on the host) overrides
    the every-``T``-steps schedule; without it: True when ``T == 1``, else ``count % T == 0``,
    read on the host in eager steps (one sync) and a 0-d bool tensor while
    :func:`funcopt.engine.is_tracing` (the refresh is then computed on every step and
    ``torch.where`` keeps it when due). Checked before any work."""
    given = extra.get("refresh")
    if given is not None:
        if not isinstance(given, bool):
            raise TypeError(f"{who}: refresh={given!r}; pass True or False (whether this step "
                            "refreshes the preconditioner, decided on the host), or leave it "
                            "out to refresh every T steps")
        return given
    if T == 1:
        return True
    if is_tracing():
        return count % T == 0
    return host_count(count) % T == 0


def with_fallback(model: nn.Module, layers: dict[str, LayerSpec],
                  natural: GradientTransformation, fallback: GradientTransformation | None,
                  who: str) -> GradientTransformation:
    """``natural`` for the supported layers' parameters and ``fallback`` for the others,
    through :func:`funcopt.partition` (``natural`` alone when there are no others)."""
    from funcopt.compose import partition  # layer 4: a lazy import, run by the aliases only

    covered = {k for s in layers.values() for k in (s.weight, s.bias) if k is not None}
    labels = {k: "natural" if k in covered else "fallback" for k, _ in model.named_parameters()}
    others = [k for k, lab in labels.items() if lab == "fallback"]
    if not others:
        return natural
    if fallback is None:
        raise ValueError(f"{who}: parameters {others} are outside supported layers; pass "
                         "fallback=<a transform> (e.g. fo.adamw(1e-3)) to train them")
    return partition({"natural": natural, "fallback": fallback}, labels)
