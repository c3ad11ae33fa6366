"""Checkpoints for functional training loops: params + optimizer state + RNG, bit-identical.

A functional loop keeps everything that decides its future in three places: the parameter
pytree, the optimizer state pytree and the random number generators. :func:`save_checkpoint`
writes all three; :func:`load_checkpoint` restores them, so the resumed loop produces exactly
the same numbers as the uninterrupted one::

    state = tx.init(params)
    for step in range(start, n_steps):
        ...
        if step % 100 == 0:
            fo.save_checkpoint("ckpt.pt", params, state, step=step)

    # later, in a fresh process
    params = init_params()                       # any values, the right structure
    ckpt = fo.load_checkpoint("ckpt.pt", params, tx.init(params))
    params, state, start = ckpt.params, ckpt.opt_state, ckpt.step + 1

Files hold only tensors, numbers, strings, lists and dicts, so they load with
``torch.load(path, weights_only=True)``. Pytree structure (NamedTuple state classes, dict keys)
is not pickled: the caller passes templates of the right structure (a fresh ``tx.init(params)``)
and the stored structure is checked against them, so a checkpoint from a different transform or
model shape is refused with an error that says what differs.

Bit-identical continuation also needs the data order to be a function of the step (or of the
restored RNG) and deterministic kernels (``torch.use_deterministic_algorithms(True)`` on GPUs).
"""

from __future__ import annotations

import os
import random
from typing import Any, NamedTuple

import numpy as np
import torch

from funcopt.base import PyTree, tree_flatten, tree_unflatten

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "tree_to_state_dict",
    "tree_from_state_dict",
    "get_rng_state",
    "set_rng_state",
]

_FORMAT = 1


def tree_to_state_dict(tree: PyTree) -> dict[str, Any]:
    """A ``weights_only``-loadable dict for a pytree of tensors.

    It holds the leaves, their shapes and dtypes, and the structure as text (used only to check
    a template on load; NamedTuple classes are never pickled).
    """
    leaves, treedef = tree_flatten(tree)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"leaf {i} of the tree is a {type(leaf).__name__}, not a tensor; "
                "store only tensors in params and optimizer state (use 0-d tensors for numbers)"
            )
    return {
        "structure": str(treedef),
        "shapes": [list(x.shape) for x in leaves],
        "dtypes": [str(x.dtype) for x in leaves],
        "leaves": list(leaves),
    }


def tree_from_state_dict(sd: dict[str, Any], like: PyTree, what: str = "tree") -> PyTree:
    """Rebuild a pytree from :func:`tree_to_state_dict` output, in the structure of ``like``.

    Each leaf keeps the stored values and lands on the device of the matching leaf of ``like``.
    Raises a ValueError naming the difference when the structure, a shape or a dtype differs.
    """
    leaves_like, treedef = tree_flatten(like)
    if sd.get("structure") != str(treedef):
        raise ValueError(
            f"the saved {what} does not match the template: it was saved from a different "
            f"transform or model.\n  saved:    {sd.get('structure')}\n  template: {treedef}\n"
            "Build the template with the same transform and parameters that wrote it."
        )
    stored = sd["leaves"]
    for i, (x, ref) in enumerate(zip(stored, leaves_like)):
        if tuple(x.shape) != tuple(ref.shape) or x.dtype != ref.dtype:
            raise ValueError(
                f"the saved {what} leaf {i} has shape {tuple(x.shape)} and dtype {x.dtype}, but "
                f"the template has {tuple(ref.shape)} and {ref.dtype}; the parameters changed "
                "shape or dtype since it was saved. Load it into a model of the saved shape."
            )
    return tree_unflatten(treedef, [x.to(ref.device) for x, ref in zip(stored, leaves_like)])


def get_rng_state() -> dict[str, Any]:
    """The state of torch (CPU and every CUDA device), Python ``random`` and NumPy's global RNG."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns."""

    params: PyTree
    opt_state: PyTree
    step: int
    extra: dict[str, Any]


def save_checkpoint(
    path: str | os.PathLike[str],
    params: PyTree,
    opt_state: PyTree,
    *,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    rng: bool = True,
) -> None:
    """Write ``params``, ``opt_state``, ``step``, ``extra`` and (``rng=True``) the RNG states.

    Args:
      path: file to write; written to ``path + ".tmp"`` first and renamed, so a crash while
        saving never leaves a truncated checkpoint behind.
      params: the parameter pytree (tensors).
      opt_state: the optimizer state pytree (tensors), as returned by ``update``.
      step: the step number to resume from (default 0).
      extra: anything else ``weights_only`` can load (numbers, strings, tensors, lists, dicts).
      rng: also save torch/CUDA, Python and NumPy RNG states (default True).
    """
    payload: dict[str, Any] = {
        "format": _FORMAT,
        "params": tree_to_state_dict(params),
        "opt_state": tree_to_state_dict(opt_state),
        "step": int(step),
        "extra": dict(extra or {}),
    }
    if rng:
        payload["rng"] = get_rng_state()
    tmp = os.fspath(path) + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | os.PathLike[str],
    params_like: PyTree,
    opt_state_like: PyTree,
    *,
    restore_rng: bool = True,
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (with ``weights_only=True``).

    Args:
      path: the file.
      params_like: a parameter pytree of the saved structure, shapes and dtypes; its values are
        not used, its leaves' devices are where the loaded leaves go.
      opt_state_like: an optimizer state of the saved structure, e.g. ``tx.init(params_like)``.
      restore_rng: restore the saved RNG states (default True; a no-op if none were saved).

    Returns:
      ``Checkpoint(params, opt_state, step, extra)``.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a funcopt checkpoint (format {_FORMAT})")
    params = tree_from_state_dict(payload["params"], params_like, "params")
    opt_state = tree_from_state_dict(payload["opt_state"], opt_state_like, "optimizer state")
    if restore_rng and "rng" in payload:
        set_rng_state(payload["rng"])
    return Checkpoint(params, opt_state, payload["step"], payload["extra"])
