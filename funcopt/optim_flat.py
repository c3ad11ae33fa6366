"""Flat storage for a :class:`funcopt.Optimizer` param group (the adapter's fast path).

An element-wise transform (:func:`funcopt.elementwise`: AdamW, SGD, Lion ...) gives the same
numbers on one buffer as on the list of parameters, so a group that runs one keeps

* its parameters in one buffer per dtype: each ``p.data`` is re-pointed to a view of it, as
  apex's and DeepSpeed's flat optimizers do (the model sees no difference);
* its gradients in a buffer of the same layout: after the gradient of ``p`` is accumulated a
  hook copies it into its view and makes ``p.grad`` that view, so the fresh gradient is freed
  at once (peak memory: parameters, gradients and state, as torch's fused AdamW); gradient
  accumulation then adds into the view in place;
* its state as the transform's state of the flat buffer (one tensor per moment).

A step is ``u, s = tx.update(g, s, p); p += u`` on the buffers: a handful of kernels over all
parameters in eager mode, one compiled kernel (and on CUDA one graph replay) with
:func:`funcopt.jit`; on a CPU, plain :func:`funcopt.adamw` and :func:`funcopt.sgd` run torch's
fused kernels on float32/float64 buffers (:mod:`funcopt.torch_kernels`). Anything that moved a
parameter to other memory since (``p.data = ...``, ``model.to(...)`` with the same dtype and
device) is copied back into the buffer before the step; a changed dtype or device is refused.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from funcopt.base import GradientTransformation, OptState, apply_updates, tree_leaves, tree_map
from funcopt.flat import _overlapping, ravel
from funcopt.flat_jit import jit
from funcopt.torch_kernels import kernel_for

__all__: list[str] = []


def can_flatten(tx: GradientTransformation, params: list[torch.Tensor]) -> bool:
    """Whether a group of ``params`` can run ``tx`` on flat storage: ``tx`` is marked
    element-wise and every parameter is a plain, contiguous floating-point tensor that requires
    grad, on one device, none overlapping another's memory (no DTensor or other subclass, no
    sparse, expanded or frozen parameter, no parameter viewing another's elements). Other groups run on the
    list of parameters, which keeps torch.optim's behaviour for those cases."""
    from funcopt.engine import is_elementwise

    if not is_elementwise(tx) or not params:
        return False
    device = params[0].device
    if not all(type(p.data) is torch.Tensor and p.layout == torch.strided and p.is_floating_point()
               and p.is_contiguous() and p.requires_grad and p.device == device
               and device.type in ("cpu", "cuda") for p in params):
        return False
    # no two parameters may share memory (tied views would be untied by the copy); views of
    # one buffer that do not overlap (an earlier flat group's) are fine
    return _overlapping(params)[1] is None


class FlatGroup:
    """One param group's buffers, gradient hooks and step (see the module docstring)."""

    def __init__(self, tx: GradientTransformation, params: list[torch.Tensor], compile: bool) -> None:
        self.tx, self.params = tx, params
        with torch.no_grad():
            self.flat, self.unravel = ravel([p.detach() for p in params])
            self.views = tree_leaves(self.unravel(self.flat))
            for p, v in zip(params, self.views):
                p.data = v
            self.grad_flat = tree_map(torch.zeros_like, self.flat)
        self.grad_views = tree_leaves(self.unravel(self.grad_flat))
        self.ptrs = [v.data_ptr() for v in self.views]
        self.expected = list(zip(params, self.ptrs, self.grad_views))
        self.fast = jit(self._pure_step) if compile else None
        # torch's fused AdamW/SGD (on a CPU; CUDA compiles), float32/float64 only: torch's
        # CPU fused SGD gives wrong numbers for float16/bfloat16 buffers, and funcopt keeps
        # float16 parameters' Adam moments in float32, which the fused AdamW kernel refuses
        self.kernel = kernel_for(tx) if params[0].device.type == "cpu" and all(
            p.dtype in (torch.float32, torch.float64) for p in params) else None
        # the state object the hyperparameter tensors were found in, the tensors, and the
        # values last written into them (the group's values, as Python numbers)
        self.written: dict[str, Any] = {}
        self.found: dict[str, torch.Tensor] = {}
        self.found_in: Any = None
        # the kernel's step prepared for the state object ``run_for`` (torch's kernels update
        # that object's tensors in place, so it stays the group's state from step to step)
        self.run: Callable[[], None] | None = None
        self.run_for: Any = None
        me = weakref.ref(self)
        self.handles = [p.register_post_accumulate_grad_hook(_GradIntoView(me, i))
                        for i, p in enumerate(params)]
        weakref.finalize(self, _remove, self.handles)

    def _pure_step(self, flat: Any, state: OptState, grads: Any) -> tuple[Any, OptState]:
        updates, state = self.tx.update(grads, state, flat)
        return apply_updates(flat, updates), state

    def init(self) -> OptState:
        return self.tx.init(self.flat)

    def gather(self) -> list[int] | None:
        """Bring every gradient into the gradient buffer and every parameter into the
        parameter buffer; returns the positions whose ``grad`` is None (their gradient view is
        zeroed), or None when no parameter has a gradient."""
        # the usual case, checked in one pass: every parameter still has its view's address
        # and every gradient is its view (the object the hook or the last step put there)
        try:
            for p, ptr, gv in self.expected:
                if p.grad is not gv or p.data_ptr() != ptr:
                    break
            else:
                return []
        except RuntimeError:  # a parameter without storage: refused below
            pass
        missing = []
        with torch.no_grad():
            moved: dict[int, torch.Tensor] = {}  # all read before any copy writes the buffer
            for i, (p, v) in enumerate(zip(self.params, self.views)):
                if p.dtype != v.dtype or p.device != v.device or p.shape != v.shape:
                    raise RuntimeError(
                        f"parameter {i} now has shape {tuple(p.shape)}, dtype {p.dtype} and device "
                        f"{p.device}, but its param group was built for shape {tuple(v.shape)}, "
                        f"dtype {v.dtype} and device {v.device}: build the optimizer after "
                        "moving, casting or reshaping the model (model.to(...)), as torch.optim "
                        "needs")
                if p.data_ptr() != v.data_ptr():  # moved since (p.data = ..., a reload)
                    d = p.data  # a view of this buffer (two parameters swapped) is copied first
                    same = d.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
                    moved[i] = d.clone() if same else d
            for i, d in moved.items():
                self.views[i].copy_(d)
                self.params[i].data = self.views[i]
            for i, (p, gv) in enumerate(zip(self.params, self.grad_views)):
                g = p.grad
                if g is not None and g.is_sparse:
                    raise RuntimeError("funcopt.Optimizer does not support sparse gradients")
                if g is None:
                    missing.append(i)
                    gv.zero_()
                elif g.data_ptr() != gv.data_ptr():
                    gv.copy_(g)
                    p.grad = gv
        return None if len(missing) == len(self.params) else missing

    def hyperparams_current(self, state: OptState, values: dict[str, Any]) -> bool:
        """Whether ``values`` are plain numbers (not tensors, whose contents may change in
        place) equal to those :meth:`write_hyperparams` last wrote into this same ``state``
        object: then they were checked then and there is nothing to write (the usual step,
        ~0.3 us; a scheduler's write of ``group["lr"]`` gives a new number, which fails it)."""
        if state is not self.found_in:
            return False
        written = self.written
        for name, value in values.items():
            if type(value) is not float and type(value) is not int or written.get(name) != value:
                return False
        return True

    def write_hyperparams(self, state: OptState, values: dict[str, Any],
                          find: Callable[[OptState], dict[str, torch.Tensor]]) -> None:
        """Write the param group's values into the state's hyperparameter tensors in place
        (a compiled or captured step reads them there; a new tensor would be a new input),
        only when a value changed. ``find`` looks the tensors up again when ``state`` is a new
        object (the eager update returns one; torch's kernels update it in place)."""
        if state is not self.found_in:
            self.found, self.found_in, self.written = find(state), state, {}
        found = self.found
        for name, value in values.items():
            key = value.item() if isinstance(value, torch.Tensor) else value
            if self.written.get(name) != key:
                with torch.no_grad():
                    found[name].fill_(value)
                self.written[name] = key

    def step(self, state: OptState, missing: list[int], extra: dict[str, Any]) -> OptState:
        """One update of the buffers in place, to be called under ``torch.no_grad()``;
        parameters without a gradient keep their values (their state still advances, as in
        the tree path)."""
        keep = [(self.views[i], self.views[i].clone()) for i in missing]
        if self.fast is not None and not extra:
            _, state = self.fast(self.flat, state, self.grad_flat)
        elif self.kernel is not None:  # plain AdamW/SGD: step keywords change nothing
            if state is not self.run_for:  # the first step, or a state given since (a load)
                self.run = self.kernel.prepare(self.flat, self.grad_flat, state)
                self.run_for = state
            assert self.run is not None
            self.run()
        else:
            updates, state = self.tx.update(self.grad_flat, state, self.flat, **extra)
            apply_updates(self.flat, updates, inplace=True)
        for v, saved in keep:
            v.copy_(saved)
        return state


class _GradIntoView:
    """The post-accumulate-grad hook of parameter ``i``: copy its fresh gradient into the
    group's gradient buffer and point ``p.grad`` at that view (a no-op once it is the view)."""

    def __init__(self, group: weakref.ref, i: int) -> None:
        self.group, self.i = group, i

    def __call__(self, p: torch.Tensor) -> None:
        group = self.group()
        if group is None or p.grad is None:
            return
        gv = group.grad_views[self.i]
        g = p.grad
        if g.is_sparse or g.data_ptr() == gv.data_ptr() or g.shape != gv.shape or g.dtype != gv.dtype:
            return  # already the view, or a gradient the step will refuse or copy
        with torch.no_grad():
            gv.copy_(g)
        p.grad = gv


def _remove(handles: list[Any]) -> None:
    for h in handles:
        h.remove()
