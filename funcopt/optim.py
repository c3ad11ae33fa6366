"""Any funcopt transform as a real :class:`torch.optim.Optimizer`.

:class:`Optimizer` runs a transform over ``p.grad`` so existing PyTorch loops (LR schedulers,
``torch.amp.GradScaler``, gradient accumulation, DDP, checkpointing through ``state_dict``)
use funcopt unchanged::

    opt = fo.Optimizer(model.parameters(), fo.adamw(learning_rate=1e-3))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step()

How hyperparameters reach ``param_groups``: the transform's state is searched, by type, for
the fields its state classes declare with :func:`funcopt.register_hyperparameters`:

* ``learning_rate`` (as kept by ``scale_by_learning_rate`` and schedule-free), exposed as
  ``group["lr"]``;
* the ``hyperparams`` dict of ``inject_hyperparams`` states; each 0-d entry is exposed under its
  own name, except ``learning_rate`` (exposed as ``lr``) and the pair ``b1``/``b2`` (exposed as
  ``betas``, as torch.optim.Adam names them, so ``OneCycleLR(cycle_momentum=True)`` works).

Before every update the group's values are written back into those state fields, keeping each
field's dtype and device. A learning rate that the transform takes from a schedule (a callable)
is recomputed by the transform every step, so writing ``lr`` has no effect on it: give a plain
number to the transform when an LR scheduler should drive it.

Flat storage: a group whose transform is element-wise (:func:`funcopt.elementwise`; the
aliases ``adamw``, ``adam``, ``sgd``, ``lion``, ``rmsprop`` ... mark themselves when no
weight-decay ``mask`` is given) and whose parameters are plain, contiguous, trainable tensors
on one device that do not overlap in memory keeps its parameters, gradients and state in one buffer each (``p.data`` and ``p.grad`` become
views of them; a large parameter is kept apart: see :mod:`funcopt.optim_flat`). Its peak memory is then that of torch's fused
AdamW (parameters, gradients, state), and on a CUDA device its step is compiled and captured
as one CUDA graph (:func:`funcopt.jit`; the first steps compile, a few seconds). Other groups
(Muon, SOAP, KFAC, masks, DTensor parameters) run the transform on the list of parameters.
``transform_states[i]`` of a flat group is the state of its flat buffer and large parameters
(one tensor per moment and leaf), which ``state_dict`` saves as such.

Differences from torch.optim: the transform sees each param group as one pytree (a list of
tensors). When some parameters of a group have ``grad is None`` they get a zero gradient and
are not moved, but the group's state still advances (torch.optim skips them entirely). Extra
keyword arguments of :meth:`Optimizer.step` (``per_sample_grads``, ``curvature`` ...) reach
every group's ``update``; a pytree-shaped extra must therefore match the group's list of
parameters, which is simplest with a single group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch

from funcopt.base import (
    GradientTransformation,
    OptState,
    PyTree,
    tree_leaves,
    tree_map,
)
from funcopt.checkpoint import tree_from_state_dict, tree_to_state_dict
from funcopt.engine import ops
from funcopt.optim_flat import FlatGroup, can_flatten
from funcopt.optim_hyperparams import find_hyperparams, from_group, set_hyperparams, to_group

__all__ = ["Optimizer", "find_hyperparams", "set_hyperparams"]

_ALLOWED_EXTRA_KEYS = frozenset({"params", "transform", "param_names", "initial_lr"})
# hyperparameters torch.optim's optimizers read from a param group: written into a group after
# construction when the transform does not expose them, they would be ignored (refused instead)
_TORCH_HYPERPARAMETERS = frozenset({
    "lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "amsgrad",
    "maximize", "alpha", "centered", "lr_decay", "rho", "lambd", "t0", "momentum_decay",
    "decoupled_weight_decay", "initial_accumulator_value", "etas", "step_sizes"})
_STATE_DICT_TAG = "funcopt.Optimizer"


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


def _storages(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {getattr(t, "_local_tensor", t).untyped_storage().data_ptr() for t in tensors}


def _unalias(state: OptState, params: list[torch.Tensor]) -> OptState:
    """Clone state leaves that share memory with ``params`` (they are about to be updated in
    place; a pure transform may legitimately keep a reference to the params it was given)."""
    ptrs = _storages(params)
    leaves = tree_leaves(state)
    if not any(isinstance(x, torch.Tensor) and _storages([x]) & ptrs for x in leaves):
        return state
    import optree

    return optree.tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) and _storages([x]) & ptrs else x, state
    )


class _Group(dict):
    """A param group whose missing keys name the fix (an LR scheduler reads ``group["lr"]``)."""

    def __missing__(self, key: Any) -> Any:
        raise KeyError(
            f"{key!r}: this param group's transform exposes no {key!r} (it exposes "
            f"{sorted(k for k in self if k not in _ALLOWED_EXTRA_KEYS)}). An LR scheduler needs "
            "a transform with a learning rate in its state: an alias such as fo.adamw(...), a "
            "chain ending in fo.scale_by_learning_rate(...), or fo.inject_hyperparams(...)")


def _check_values(group: dict[str, Any], names: Iterable[str]) -> None:
    """Refuse a group value no transform step can use (NaN, inf, a negative learning rate,
    betas outside [0, 1)), naming the key: checked at construction and before every step, as
    a scheduler or a user may write them at any time (Python numbers: no device sync)."""
    for key in names:
        key = "lr" if key == "learning_rate" else "betas" if key in ("b1", "b2") else key
        value = group.get(key)
        values = value if key == "betas" and isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"param group {key}={v!r}: give a number or a 0-d tensor")
                if not v.is_cpu:
                    continue
                v = v.item()
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"param group {key}={value!r}: give a finite number")
            if key == "lr" and v < 0:
                raise ValueError(f"param group lr={value!r} must be >= 0")
            if key == "betas" and not 0 <= v < 1:
                raise ValueError(f"param group betas={value!r}: each beta must lie in [0, 1)")


def _tree(group: dict[str, Any], tensors: list[torch.Tensor]) -> Any:
    """What the transform sees: a dict keyed by parameter name when the group has names
    (``model.named_parameters()``; KFAC and SINGD need them), else a list."""
    names = group.get("param_names")
    return dict(zip(names, tensors)) if names else tensors


def _values(tree: Any) -> list[Any]:
    return list(tree.values()) if isinstance(tree, dict) else list(tree)


class Optimizer(torch.optim.Optimizer):
    """A :class:`torch.optim.Optimizer` that applies a funcopt transform to ``p.grad``.

    Each step computes, per param group with parameters ``theta`` and gradients ``g``::

        u, s = transform.update(g, s, theta, **extra)
        theta <- theta + u            (in place, in each parameter's dtype)

    Args:
      params: parameters (an iterable of tensors or of ``(name, tensor)`` pairs) or param-group
        dicts. A group may carry its own ``"transform"`` and its own hyperparameter values
        (``"lr"``, ``"betas"``, or any name exposed by ``inject_hyperparams``).
      transform: the transform for groups that carry none (may be ``None`` if all groups do).
      **hyperparams: values for every group that does not set them, e.g. ``lr=1e-3``. Each must
        be a hyperparameter the transform exposes (see the module docstring); otherwise a
        ValueError says which ones are available.

    The transform state of group ``i`` is ``opt.transform_states[i]`` (initialised eagerly, so
    ``lr`` is in ``param_groups`` before the first step, as LR schedulers need).
    ``state_dict()`` holds only tensors, numbers and strings (``torch.load(weights_only=True)``
    works); ``load_state_dict`` checks the saved structure and shapes against this optimizer's.
    """

    def __init__(
        self,
        params: Iterable[Any],
        transform: GradientTransformation | None = None,
        **hyperparams: Any,
    ) -> None:
        if transform is not None and not isinstance(transform, GradientTransformation):
            raise TypeError(
                f"transform must be a GradientTransformation, got {type(transform).__name__}; "
                "pass e.g. fo.adamw(learning_rate=1e-3), not the factory fo.adamw"
            )
        self._default_transform = transform
        self._group_defaults = dict(hyperparams)
        self._transforms: list[GradientTransformation] = []
        self.transform_states: list[OptState] = []
        self._hyper_names: list[list[str]] = []
        self._flat: list[FlatGroup | None] = []
        self._group_sizes: list[int] = []  # len(group) last checked for keys the step ignores
        super().__init__(params, {})
        first = self.param_groups[0]
        self.defaults = {k: v for k, v in first.items() if k not in _ALLOWED_EXTRA_KEYS}

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (``{"params": ..., "transform"?: ..., hyperparameters...}``) and
        initialise its transform state on the group's parameters."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = _Group(param_group)
        tx = group.pop("transform", self._default_transform)
        if not isinstance(tx, GradientTransformation):
            raise ValueError(
                "this param group has no transform: pass Optimizer(params, transform) or put "
                "'transform': fo.<method>(...) in the group dict"
            )
        raw = group["params"]
        raw = [raw] if isinstance(raw, torch.Tensor) else list(raw)
        if raw and all(isinstance(p, tuple) for p in raw):
            group["param_names"] = [n for n, _ in raw]
            raw = [p for _, p in raw]
        for p in raw:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must be tensors, got {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf tensor; pass model.parameters()")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in raw}) != len(raw) or any(id(p) in seen for p in raw):
            raise ValueError("some parameters appear twice (within or across param groups)")
        if not raw:
            raise ValueError("a param group has no parameters")
        group["params"] = raw
        names = group.get("param_names")
        if names is not None and len(set(names)) != len(names):
            raise ValueError("param group has repeated parameter names")
        flat = FlatGroup(tx, raw, compile=raw[0].is_cuda) if can_flatten(tx, raw) else None
        if flat is not None:
            state = flat.init()
        else:
            params = [p.detach() for p in raw]
            state = _unalias(tx.init(_tree(group, params)), params)
        found = find_hyperparams(state)
        exposed = to_group(found)
        for key, value in self._group_defaults.items():
            group.setdefault(key, value)
        unknown = sorted(k for k in group if k not in exposed and k not in _ALLOWED_EXTRA_KEYS)
        if unknown:
            raise ValueError(
                f"param group sets {unknown}, which the transform does not expose; it exposes "
                f"{sorted(exposed)}. Build the transform with fo.inject_hyperparams(factory)(...) "
                "to make other hyperparameters settable, or drop these keys."
            )
        for key, value in exposed.items():
            group.setdefault(key, value)
        _check_values(group, found)
        self._transforms.append(tx)
        self._flat.append(flat)
        self.transform_states.append(state)
        self._hyper_names.append(list(found))
        self._group_sizes.append(len(group))
        self.param_groups.append(group)

    # ------------------------------------------------------------------ step

    def step(self, closure: Callable[[], Any] | None = None, **extra: Any) -> Any:
        """One update of every param group; returns the closure's loss (or None).

        Args:
          closure: re-evaluates the model and returns the loss (it may call ``backward``);
            its detached value is passed to the transform as ``value`` unless given in extra.
          **extra: keyword arguments for the transform's ``update`` (``per_sample_grads``,
            ``curvature``, ``value`` ...), given to every group.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if loss is not None and "value" not in extra:
                extra["value"] = loss.detach() if isinstance(loss, torch.Tensor) else loss
        # under no_grad, as torch.optim does it (a set and a reset: the decorator costs ~2 us)
        prev = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            for i, group in enumerate(self.param_groups):
                self._step_group(i, group, extra)
        finally:
            torch.set_grad_enabled(prev)
        return loss

    def _step_group(self, i: int, group: dict[str, Any], extra: dict[str, Any]) -> None:
        if len(group) != self._group_sizes[i]:  # keys added since: none the step would ignore
            self._check_added_keys(i, group)
        flat = self._flat[i]
        if flat is not None:
            missing = flat.gather()
            if missing is None:
                return
            state, names = self.transform_states[i], self._hyper_names[i]
            if names:
                values = from_group(group, names)
                if not flat.hyperparams_current(state, values):  # a change since the last step
                    _check_values(group, names)
                    flat.write_hyperparams(state, values, find_hyperparams)
            self.transform_states[i] = flat.step(state, missing, extra)
            return
        params: list[torch.Tensor] = group["params"]
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            return
        for g in grads:
            if g is not None and g.is_sparse:
                raise RuntimeError("funcopt.Optimizer does not support sparse gradients")
        grads_full = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        state = self.transform_states[i]
        names = self._hyper_names[i]
        if names:
            _check_values(group, names)
            state = set_hyperparams(state, from_group(group, names))
        detached = [p.detach() for p in params]
        updates, state = self._transforms[i].update(
            _tree(group, grads_full), state, _tree(group, detached), **extra)
        self.transform_states[i] = _unalias(state, detached)
        moved = [(p, u) for p, u, g in zip(detached, _values(updates), grads) if g is not None]
        targets = [p for p, _ in moved]
        ops.add_(targets, [u if u.dtype == p.dtype else u.to(p.dtype) for p, u in moved])

    def _check_added_keys(self, i: int, group: dict[str, Any]) -> None:
        names = {"lr" if n == "learning_rate" else n for n in self._hyper_names[i]}
        if {"b1", "b2"} <= names:
            names.add("betas")
        ignored = sorted(k for k in group if k in _TORCH_HYPERPARAMETERS and k not in names)
        if ignored:
            raise ValueError(
                f"param group {i} now sets {ignored}, which its transform does not expose as "
                "hyperparameters, so the step would ignore them (torch.optim would apply them); "
                "build the transform with fo.inject_hyperparams(factory)(...) to change them "
                "between steps, or do not set them")
        self._group_sizes[i] = len(group)

    # ------------------------------------------------------------------ state_dict

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {group index: tree dict}, "param_groups": [...], "format": ...}``: a
        snapshot, which later steps do not change."""
        groups: list[dict[str, Any]] = []
        start = 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(packed)
        # flat groups update their state in place (torch's kernels, fo.jit): a copy keeps
        # this dict a snapshot that later steps do not change
        states = {i: tree_to_state_dict(s if f is None else tree_map(_copy, s))
                  for i, (s, f) in enumerate(zip(self.transform_states, self._flat))}
        # a flat group's state has one tensor per moment for all its parameters: only the
        # parameters' shapes tell two groups of equal total size apart
        shapes = {i: [list(p.shape) for p in g["params"]] for i, g in enumerate(self.param_groups)}
        return {"format": _STATE_DICT_TAG, "state": states, "param_groups": groups,
                "shapes": shapes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises a ValueError if it came from a different
        transform, number of groups or parameter shapes."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != _STATE_DICT_TAG:
            raise ValueError(
                "this state_dict was not written by funcopt.Optimizer.state_dict() (a "
                "torch.optim optimizer's state_dict cannot be loaded into a funcopt transform)"
            )
        missing = [k for k in ("state", "param_groups") if not isinstance(state_dict.get(k), (dict, list))]
        if missing:
            raise ValueError(f"this state_dict has no valid {missing}: pass the whole dict that "
                             "Optimizer.state_dict() returned")
        saved = cast(list[dict[str, Any]], state_dict["param_groups"])
        if len(saved) != len(self.param_groups):
            raise ValueError(
                f"the state_dict has {len(saved)} param groups, this optimizer has "
                f"{len(self.param_groups)}; build the optimizer with the same groups"
            )
        bad = [f"param_groups[{i}]" for i, s in enumerate(saved)
               if not isinstance(s, dict) or not isinstance(s.get("params"), list)]
        if not isinstance(state_dict.get("shapes", {}), dict):
            bad.append("shapes")
        if bad:
            raise ValueError(f"this state_dict's {', '.join(bad)} is not as "
                             "Optimizer.state_dict() writes it (a dict with a 'params' list; "
                             "'shapes' a dict): pass the whole dict that Optimizer.state_dict() "
                             "returned")
        new_states: list[PyTree] = []
        for i, (g, s) in enumerate(zip(self.param_groups, saved)):
            if len(s["params"]) != len(g["params"]):
                raise ValueError(
                    f"param group {i} has {len(g['params'])} parameters but the state_dict's has "
                    f"{len(s['params'])}; build the optimizer over the same parameters"
                )
            saved_shapes = state_dict.get("shapes", {}).get(i)
            now = [list(p.shape) for p in g["params"]]
            if saved_shapes is not None and [list(x) for x in saved_shapes] != now:
                raise ValueError(f"param group {i}: the state_dict was saved for parameters of "
                                 f"shapes {saved_shapes}, this optimizer's are {now}; build the "
                                 "optimizer over the same parameters")
            if i not in state_dict["state"]:
                raise ValueError(f"this state_dict holds no state for param group {i}; pass "
                                 "the whole dict that Optimizer.state_dict() returned")
            try:
                loaded = tree_from_state_dict(state_dict["state"][i], self.transform_states[i],
                                              f"state of param group {i}")
            except ValueError as e:  # a layout of flat storage older than its own leaves
                flat = self._flat[i]
                note = "" if flat is None or not flat.own else (
                    "\nThis group keeps its large parameters (>= 1/16 of the group and 2**22 "
                    "elements) as their own leaves of the state; a state_dict written when they "
                    "were inside the one flat buffer cannot be loaded: restart the optimizer "
                    "state, or load it with the funcopt version that wrote it.")
                raise ValueError(f"{e}{note}") from None
            # copies: a flat group updates its state in place, which must not write into the
            # given dict (nor into another optimizer that loaded the same dict)
            new_states.append(tree_map(_copy, loaded))
        self.transform_states = new_states
        for g, s in zip(self.param_groups, saved):
            g.update({k: v for k, v in s.items() if k != "params"})
