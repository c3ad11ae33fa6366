"""Flat storage for a :class:`funcopt.Optimizer` param group (the adapter's fast path).

An element-wise transform (:func:`funcopt.elementwise`: AdamW, SGD, Lion ...) gives the same
numbers on any tree of the same elements, so a group that runs one steps a tree of a few
leaves: one buffer per dtype for its small parameters and each large parameter as its own leaf.

* Small parameters live in one buffer per dtype: each ``p.data`` is re-pointed to a view of it,
  as apex's and DeepSpeed's flat optimizers do (the model sees no difference). Their gradients
  live in a buffer of the same layout: after the gradient of ``p`` is accumulated a hook copies
  it into its view and makes ``p.grad`` that view, so the fresh gradient is freed at once;
  gradient accumulation then adds into the view in place.
* A large parameter (:func:`own_leaves`: at least 1/16 of the group's elements and at least
  2**22 of them) keeps its own storage and autograd's own gradient as ``p.grad`` (no hook, no
  copy), as torch's fused AdamW does. Copied into a gradient buffer that already holds its
  place, two of its gradients would be alive at once: on an H100, a 184M-parameter GPT whose
  embedding is 221 MiB peaked at 2328 MiB over gradients and AdamW state, against torch
  fused's 2108 MiB; as its own leaf, at 2107 MiB, with the same step time (1.97 ms).
* The state is the transform's state of that tree (one tensor per moment and leaf); a group
  with no large parameter has the state of its buffer (one tensor per moment).

A step is ``u, s = tx.update(g, s, p); p += u`` on the tree: a handful of kernels over all
parameters in eager mode, one compiled step (on CUDA one graph replay while each large
parameter's gradient comes at the address the graph was captured with) with :func:`funcopt.jit`; on a CPU, plain
:func:`funcopt.adamw` and :func:`funcopt.sgd` run torch's fused kernels on float32/float64
leaves (:mod:`funcopt.torch_kernels`). Anything that moved a parameter to other memory since
(``p.data = ...``, ``model.to(...)`` with the same dtype and device) is copied back into the
group's tensor before the step; a changed dtype or device is refused.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, cast

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
    sparse, expanded or frozen parameter, no parameter viewing another's elements). On a CPU,
    where none of torch's fused kernels runs ``tx`` (:func:`funcopt.torch_kernels.kernel_for`),
    the flat buffer must not exceed :data:`CPU_PURE_FLAT_BYTES`: the pure step's temporaries
    of a larger one are fresh memory maps every step (page faults: Lion over 2e7 parameters in
    200 tensors took 2.4x the list's time). Other groups run on the list of parameters, which
    keeps torch.optim's behaviour for those cases."""
    from funcopt.engine import is_elementwise

    if not is_elementwise(tx) or not params:
        return False
    device = params[0].device
    if not all(type(p.data) is torch.Tensor and p.layout == torch.strided and p.is_floating_point()
               and p.is_contiguous() and p.requires_grad and p.device == device
               and device.type in ("cpu", "cuda") for p in params):
        return False
    if device.type == "cpu" and cpu_kernel(tx, params) is None:
        own = own_leaves([p.numel() for p in params])
        if sum(p.numel() * p.element_size() for p, o in zip(params, own) if not o) \
                > CPU_PURE_FLAT_BYTES:
            return False
    # no two parameters may share memory (tied views would be untied by the copy); views of
    # one buffer that do not overlap (an earlier flat group's) are fine
    return _overlapping(params)[1] is None


# a parameter is its own leaf (own storage, autograd's gradient) when it holds at least
# 1/OWN_FRACTION of its group's elements and at least OWN_MIN_ELEMENTS (see own_leaves)
OWN_FRACTION = 16
OWN_MIN_ELEMENTS = 2**22
_WARMUP = 2  # fo.jit's real steps before it captures a CUDA graph
CPU_PURE_FLAT_BYTES = 32 * 2**20
"""glibc's largest threshold for serving an allocation from its heap (larger ones are mapped
and unmapped each time); a flat buffer above it runs a pure step on the list instead."""


def cpu_kernel(tx: GradientTransformation, params: list[torch.Tensor]) -> Any:
    """torch's fused AdamW/SGD kernel for ``tx`` on a CPU group of ``params``
    (:func:`funcopt.torch_kernels.kernel_for`; CUDA compiles instead), or None: float32 and
    float64 only, since torch's CPU fused SGD gives wrong numbers for float16/bfloat16 buffers
    and funcopt keeps float16 parameters' Adam moments in float32, which the fused AdamW
    kernel refuses."""
    if any(p.dtype not in (torch.float32, torch.float64) for p in params):
        return None
    return kernel_for(tx)


def own_leaves(numels: list[int]) -> list[bool]:
    """Which parameters of a group (given their numbers of elements) are their own leaves:
    those with ``n >= total / 16`` and ``n >= 2**22``.

    A parameter in the buffer costs, once per backward, its fresh gradient on top of the
    gradient buffer while the hook copies it in; a leaf of its own costs the step one more
    tensor and some host work (on an H100, about 0.08 ms a step: re-pointing its gradient for
    the CUDA graph). With ``n >= total / 16`` at most 16 parameters are leaves and what stays
    above torch fused's peak is one gradient of under 1/16 of the group (under 1/64 of Adam's
    four numbers per element); with ``n >= 2**22`` a copy of at most 16 MiB (float32) is kept
    where the step is short and the host work would show (a 5M-parameter model with a 2M
    embedding: 0.31 ms a step against 0.23 ms, to save 8 MiB). On a 184M-parameter GPT (a
    58M-element embedding) the peak is torch fused's and the step as fast as one buffer's."""
    total = sum(numels)
    return [n >= OWN_MIN_ELEMENTS and n * OWN_FRACTION >= total for n in numels]


class FlatGroup:
    """One param group's buffers, gradient hooks and step (see the module docstring).

    ``views[i]`` is the tensor the step writes for parameter ``i`` (a view of ``flat``, or the
    parameter's own storage); ``grad_views[i]`` its gradient's view of ``grad_flat`` (None for
    a parameter that is its own leaf); ``tree`` the step's parameters: ``flat`` when every
    parameter is in it, else ``[flat, *own]`` (``[*own]`` when none is)."""

    def __init__(self, tx: GradientTransformation, params: list[torch.Tensor], compile: bool) -> None:
        self.tx, self.params = tx, params
        own = own_leaves([p.numel() for p in params])
        small = [i for i, o in enumerate(own) if not o]
        self.views: list[torch.Tensor] = [p.detach() for p in params]
        self.grad_views: list[torch.Tensor | None] = [None] * len(params)
        self.flat: Any = None
        self.grad_flat: Any = None
        if small:
            with torch.no_grad():
                self.flat, unravel = ravel([params[i].detach() for i in small])
                self.grad_flat = tree_map(torch.zeros_like, self.flat)
            for i, v, gv in zip(small, tree_leaves(unravel(self.flat)), tree_leaves(unravel(self.grad_flat))):
                params[i].data = v
                self.views[i], self.grad_views[i] = v, gv
        self.own = [(i, params[i]) for i, o in enumerate(own) if o]
        leaves = [self.views[i] for i, _ in self.own]
        self.tree: Any = self.flat if not leaves else [self.flat, *leaves] if small else leaves
        self.ptrs = [v.data_ptr() for v in self.views]
        self.expected = [(params[i], self.ptrs[i], self.grad_views[i]) for i in small]
        self.own_expected = [(p, self.ptrs[i]) for i, p in self.own]
        # storages of the group's tensors: a parameter re-pointed to one of them is copied
        # before any is written (two parameters swapped)
        self.storages = {v.untyped_storage().data_ptr() for v in self.views}
        self.grads: Any = None  # the step's gradient tree, from gather to step only
        self.fast = jit(self._pure_step, warmup=_WARMUP) if compile else None
        # a large parameter's gradient is a new tensor every step, which a CUDA graph reads
        # from the address it was captured with: the graphed step is given it through a tensor
        # of its own (``slots``, re-pointed at it for the call) and replays only while every
        # such gradient lies at the captured address (``pinned``; the caching allocator gives
        # a loop the same block every step); otherwise the step runs compiled, without a graph
        self.slots = [torch.empty(0, dtype=p.dtype, device=p.device) for _, p in self.own]
        self.empty = [torch.empty(0, dtype=p.dtype, device=p.device) for _, p in self.own]
        self.slot_tree = self._grad_tree(self.slots)
        self.graph = compile and params[0].is_cuda and bool(self.own)
        self.graph_calls, self.pinned = 0, cast(list[int] | None, None)
        self.unpinned: Callable[..., Any] | None = None
        self.kernel = cpu_kernel(tx, params) if params[0].device.type == "cpu" else None
        # the state object the hyperparameter tensors were found in, the tensors, and the
        # values last written into them (the group's values, as Python numbers)
        self.written: dict[str, Any] = {}
        self.found: dict[str, torch.Tensor] = {}
        self.found_in: Any = None
        # the kernel's step prepared for the state object ``run_for`` (torch's kernels update
        # that object's tensors in place, so it stays the group's state from step to step);
        # only for a group with no large parameter (a prepared step would hold its gradient)
        self.run: Callable[[], None] | None = None
        self.run_for: Any = None
        me = weakref.ref(self)
        self.handles = [params[i].register_post_accumulate_grad_hook(_GradIntoView(me, i))
                        for i in small]
        weakref.finalize(self, _remove, self.handles)

    def _pure_step(self, tree: Any, state: OptState, grads: Any) -> tuple[Any, OptState]:
        updates, state = self.tx.update(grads, state, tree)
        return apply_updates(tree, updates), state

    def init(self) -> OptState:
        return self.tx.init(self.tree)

    def _grad_tree(self, own_grads: list[torch.Tensor]) -> Any:
        if not own_grads:
            return self.grad_flat
        return [self.grad_flat, *own_grads] if self.flat is not None else own_grads

    def gather(self) -> list[int] | None:
        """Bring every small parameter's gradient into the gradient buffer and every parameter
        into the group's tensors, and keep the step's gradient tree (``self.grads``); returns
        the positions whose ``grad`` is None (their gradient is zero), or None when no
        parameter has a gradient."""
        # the usual case, checked in one pass: every parameter still has its tensor's address,
        # every small parameter's gradient is its view (the object the hook or the last step
        # put there) and every large one has a dense gradient
        try:
            for p, ptr, gv in self.expected:
                if p.grad is not gv or p.data_ptr() != ptr:
                    break
            else:
                own_grads = [p.grad for p, _ in self.own_expected]
                if all(g is not None and g.layout == torch.strided and g.is_contiguous()
                       and p.data_ptr() == ptr for g, (p, ptr) in zip(own_grads, self.own_expected)):
                    self.grads = self._grad_tree(cast(list[torch.Tensor], own_grads))
                    return []
        except RuntimeError:  # a parameter without storage: refused below
            pass
        with torch.no_grad():
            self._take_back()
            return self._gather_grads()

    def _take_back(self) -> None:
        """Copy a parameter moved since (``p.data = ...``, a reload) back into its tensor and
        point it there again; refuse another shape, dtype or device."""
        moved: dict[int, torch.Tensor] = {}  # all read before any copy writes the group's tensors
        for i, (p, v) in enumerate(zip(self.params, self.views)):
            if p.dtype != v.dtype or p.device != v.device or p.shape != v.shape:
                raise RuntimeError(
                    f"parameter {i} now has shape {tuple(p.shape)}, dtype {p.dtype} and device "
                    f"{p.device}, but its param group was built for shape {tuple(v.shape)}, "
                    f"dtype {v.dtype} and device {v.device}: build the optimizer after "
                    "moving, casting or reshaping the model (model.to(...)), as torch.optim "
                    "needs")
            if p.data_ptr() != v.data_ptr():
                d = p.data  # one of the group's tensors (two parameters swapped) is copied first
                moved[i] = d.clone() if d.untyped_storage().data_ptr() in self.storages else d
        for i, d in moved.items():
            self.views[i].copy_(d)
            self.params[i].data = self.views[i]

    def _gather_grads(self) -> list[int] | None:
        missing: list[int] = []
        own_grads: list[torch.Tensor] = []
        for i, (p, gv) in enumerate(zip(self.params, self.grad_views)):
            g = p.grad
            if g is not None and g.is_sparse:
                raise RuntimeError("funcopt.Optimizer does not support sparse gradients")
            if g is None:
                missing.append(i)
            if gv is None:  # its own leaf: autograd's gradient, or zeros for the step
                own_grads.append(torch.zeros_like(p) if g is None else
                                 g if g.is_contiguous() else g.contiguous())
            elif g is None:
                gv.zero_()
            elif g.data_ptr() != gv.data_ptr():
                gv.copy_(g)
                p.grad = gv
        if len(missing) == len(self.params):
            return None
        self.grads = self._grad_tree(own_grads)
        return missing

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
        """One update of the group's tensors in place with the gradients :meth:`gather` kept,
        to be called under ``torch.no_grad()``; parameters without a gradient keep their values
        (their state still advances, as in the tree path). No gradient is held afterwards (a
        large parameter's is freed by ``zero_grad``, as torch.optim's)."""
        keep = [(self.views[i], self.views[i].clone()) for i in missing]
        grads, self.grads = self.grads, None
        if self.fast is not None and not extra:
            state = self._compiled(state, grads)
        elif self.kernel is not None and self.own:  # prepared each step: it holds the gradients
            self.kernel(self.tree, grads, state)
        elif self.kernel is not None:  # plain AdamW/SGD: step keywords change nothing
            if state is not self.run_for:  # the first step, or a state given since (a load)
                self.run = self.kernel.prepare(self.tree, grads, state)
                self.run_for = state
            assert self.run is not None
            self.run()
        else:
            updates, state = self.tx.update(grads, state, self.tree, **extra)
            apply_updates(self.tree, updates, inplace=True)
        for v, saved in keep:
            v.copy_(saved)
        return state


    def _compiled(self, state: OptState, grads: Any) -> OptState:
        """The step with :func:`funcopt.jit`: graphed (see ``slots`` in ``__init__``) while the
        large parameters' gradients lie where the graph was captured, else compiled only."""
        assert self.fast is not None
        if not self.graph:
            return self.fast(self.tree, state, grads)[1]
        own = grads[1:] if self.flat is not None else grads
        ptrs = [g.data_ptr() for g in own]
        if self.graph_calls <= _WARMUP or ptrs == self.pinned:
            if self.graph_calls == _WARMUP:  # this call captures the graph (fo.jit's warmup)
                self.pinned = ptrs
            self.graph_calls = min(self.graph_calls + 1, _WARMUP + 1)
            for slot, g in zip(self.slots, own):
                slot.set_(g)
            try:
                return self.fast(self.tree, state, self.slot_tree)[1]
            finally:
                for slot, empty in zip(self.slots, self.empty):
                    slot.set_(empty.untyped_storage())  # hold no gradient past the step
        if self.unpinned is None:
            self.unpinned = jit(self._pure_step, graph=False)
        return self.unpinned(self.tree, state, grads)[1]


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
