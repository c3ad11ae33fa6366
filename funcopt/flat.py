"""Flat parameter storage: a whole pytree in one contiguous buffer per (dtype, device).

An optimizer step is memory-bound: it should read and write each parameter and state byte
once. :func:`funcopt.flatten` gets a chain down to a few kernels but copies the parameters and
gradients into flat buffers on every step. Keeping the parameters *stored* flat removes those
copies: the model sees views of the buffers, the gradient is taken with respect to the buffers,
and any element-wise transform updates the buffers directly (a 1-D tensor, or a tuple of them,
is itself a pytree)::

    flat, unravel = fo.ravel(params)          # one copy, once
    loss_of_flat = lambda flat, batch: loss_fn(unravel(flat), batch)
    tx = fo.adamw(1e-3)
    state = tx.init(flat)

    @torch.compile(fullgraph=True)            # one fused kernel for the whole step
    def step(flat, state, grads):
        updates, state = tx.update(grads, state, flat)
        return fo.apply_updates(flat, updates), state

    for batch in data:
        grads = torch.func.grad(loss_of_flat)(flat, batch)
        flat, state = step(flat, state, grads)

``unravel`` returns views (no copy), so ``unravel(flat)`` is free. Shape-aware methods (SOAP,
Muon, Shampoo, KFAC) need the tree: run them on ``unravel(flat)``.

Where the host, not the memory, sets the pace (many small steps, a slow Python process), a
step captured by :func:`cuda_graph` costs one graph launch per call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from funcopt.base import PyTree, tree_flatten, tree_map, tree_unflatten

__all__ = ["ravel", "donated", "cuda_graph"]


def ravel(tree: PyTree) -> tuple[Any, Callable[[Any], PyTree]]:
    """Copy ``tree``'s leaves into one 1-D buffer per (dtype, device) group.

    Returns ``(flat, unravel)``: ``flat`` is a 1-D tensor when all leaves share a dtype and
    device, else a tuple of 1-D tensors (one per group, in order of first appearance);
    ``unravel(flat)`` rebuilds the tree as views of ``flat`` (no copy), and also works on any
    tensor(s) of ``flat``'s shapes, such as gradients or updates.
    """
    leaves, treedef = tree_flatten(tree)
    for i, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ravel: leaf {i} is a {type(x).__name__}, not a tensor")
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.dtype, x.device), []).append(i)
    order = list(groups.values())
    shapes = [x.shape for x in leaves]
    sizes = [[leaves[i].numel() for i in g] for g in order]
    buffers = tuple(
        torch.cat([leaves[i].detach().reshape(-1) for i in g]) if g else torch.empty(0)
        for g in order
    )
    single = len(buffers) == 1

    def unravel(flat: Any) -> PyTree:
        bufs = (flat,) if single else tuple(flat)
        if len(bufs) != len(order) or any(b.dim() != 1 or b.numel() != sum(s) for b, s in zip(bufs, sizes)):
            raise ValueError(
                "unravel: the flat input does not match the raveled tree: expected "
                f"{len(order)} 1-D buffer(s) of sizes {[sum(s) for s in sizes]}"
            )
        out: list[Any] = [None] * len(leaves)
        for g, buf, sz in zip(order, bufs, sizes):
            for i, part in zip(g, torch.split(buf, sz)):
                out[i] = part.view(shapes[i])
        return tree_unflatten(treedef, out)

    return (buffers[0] if single else buffers), unravel


def donated(step: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
    """Run a pure ``step(params, state, *args) -> (params, state)`` and write its results back
    into the input tensors, returning the inputs.

    The numbers are those of ``step``; only the storage differs. Under ``torch.compile`` the
    copies fuse into the step's kernels, so an optimizer step reads and writes each byte once
    and keeps fixed addresses (what CUDA graphs need). Use it only when nothing else holds the
    old values: they are overwritten. For the same reason the params and the state must not
    share tensors, and a result may alias an input only at its own position (a leaf passed
    through unchanged); other aliasing raises a ValueError in eager mode (under compile it is
    not checked).
    """

    def wrapped(params: Any, state: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        new_params, new_state = step(params, state, *args, **kwargs)
        dst = tree_flatten(params)[0] + tree_flatten(state)[0]
        src = tree_flatten(new_params)[0] + tree_flatten(new_state)[0]
        if len(dst) != len(src):
            raise ValueError("donated: the step returned trees with other leaves than it was given")
        with torch.no_grad():
            if torch.compiler.is_compiling():
                # one copy per leaf fuses into the step's own kernels; a single foreach copy
                # made Inductor emit a combined kernel that ran at 1.56x the bandwidth floor on
                # an H100 (1e9 parameters), against 1.03-1.09x this way
                # (benchmarks/compile_variants.py, results in benchmarks/RESULTS.md)
                for d, s in zip(dst, src):
                    d.copy_(s)
            else:
                _check_no_aliasing(dst, src)
                _copy_into(dst, src)
        return params, state

    return wrapped


def _copy_into(dst: list[Any], src: list[Any]) -> None:
    """``dst[i].copy_(src[i])`` as one foreach copy, skipping the pairs that are one tensor
    already (an inner donated step, or the captured tensors passed back in)."""
    moved = [(d, s) for d, s in zip(dst, src) if d is not s]
    if moved:
        torch._foreach_copy_([d for d, _ in moved], [s for _, s in moved])


def _check_no_aliasing(dst: list[Any], src: list[Any]) -> None:
    """Copying ``src[i]`` into ``dst[i]`` one by one is only the pure step's result when no
    ``dst`` tensor is read after it was written: no two inputs share a start address and no
    result starts where another position's input does."""
    where: dict[tuple, int] = {}
    for i, d in enumerate(dst):
        if d.numel():
            key = (d.device, d.data_ptr())
            if key in where:
                raise ValueError(
                    f"donated: inputs {where[key]} and {i} (params then state, in tree order) "
                    "share memory, so writing one overwrites the other; give the state its own "
                    "tensors (e.g. clone them) or use the pure step"
                )
            where[key] = i
    for i, s in enumerate(src):
        j = where.get((s.device, s.data_ptr())) if s.numel() else None
        if j is not None and j != i:
            raise ValueError(
                f"donated: result {i} is input {j} (params then state, in tree order), which is "
                "overwritten by then; return a copy (e.g. x.clone()) or use the pure step"
            )


def cuda_graph(step: Callable[..., tuple[Any, Any]], params: Any, state: Any, *args: Any,
               warmup: int = 2) -> Callable[..., tuple[Any, Any]]:
    """Capture ``step(params, state, *args) -> (params, state)`` as one CUDA graph.

    Returns ``graphed``, called like ``step``: ``params, state = graphed(params, state, *args)``.
    Each call replays the captured kernels, so its host cost is one graph launch whatever the
    number of leaves and kernels. ``step`` is a pure step (eager or compiled), or one already
    wrapped in :func:`donated` (compile ``fo.donated(step)`` to fuse the write-back into the
    step's kernels); its results are written back into ``params`` and ``state`` as by
    :func:`donated`, so the numbers are those of ``step``.

    The graph keeps the tensors it was captured with: ``graphed`` returns those same trees
    (overwritten by the next call). Passing other trees of the same structure, shapes and
    dtypes costs a copy into the captured tensors (for ``args``: pass the captured tensors
    themselves, e.g. fill them in place, to avoid it). ``params`` and ``state`` are left
    unchanged by the capture: the ``warmup`` calls that run compilation and lazy set-up
    before it run on copies (one copy of params and state is held meanwhile).

    ``graphed`` holds the captured trees and ``step`` (as ``graphed.step``), and with it every
    device tensor the step closes over: the graph reads them at their captured addresses.

    The step must run entirely on one CUDA device with no host reads of device values (such
    as ``.item()`` or a data-dependent Python branch): a graph replays device work only. All
    leaves must be tensors on that device, so that no part of the state is updated on the host
    once at capture and then never again.
    """
    if warmup < 1:
        raise ValueError(f"cuda_graph: warmup={warmup}; at least 1 call must run before capture "
                         "(compilation and lazy CUDA set-up cannot be captured)")
    trees = (params, state) + args
    leaves, specs = zip(*(tree_flatten(t) for t in trees))
    device = _graph_device(leaves)
    inner = donated(step)
    with torch.no_grad():
        copies = [tree_map(torch.clone, t) for t in (params, state)]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            inner(copies[0], copies[1], *args)
    torch.cuda.current_stream(device).wait_stream(side)
    del copies
    graph = torch.cuda.CUDAGraph()
    try:
        # captured on the stream that ran the warm-up: cuBLAS keeps a workspace per stream, and
        # one first made inside a capture lives in that graph's private memory, where eager work
        # or another graph on the same stream would find it (pytorch/pytorch#193402)
        with torch.cuda.graph(graph, stream=side):
            inner(params, state, *args)
    except RuntimeError as e:
        if "captur" not in str(e):
            raise
        raise RuntimeError(
            "cuda_graph: the step cannot be captured as a CUDA graph; it reads a device value on "
            "the host (.item(), a data-dependent branch, a host-side check) or synchronises. Run "
            f"it without cuda_graph, or remove the host read. The CUDA error was: {e}") from e

    def graphed(*given: Any) -> tuple[Any, Any]:
        if len(given) != len(trees):
            raise TypeError(f"cuda_graph: the step was captured with {len(trees)} arguments "
                            f"(params, state and {len(args)} more), got {len(given)}")
        for k, (new, old) in enumerate(zip(given, trees)):
            if new is not old:
                _copy_in(k, new, specs[k], leaves[k])
        graph.replay()
        return params, state

    # the graph reads every device tensor the step closes over (a model's buffers, tensor
    # hyperparameters) at the address it had at capture: holding the step keeps them alive
    graphed.step = inner  # type: ignore[attr-defined]

    return graphed


def _graph_device(leaves: Sequence[list[Any]]) -> torch.device:
    flat = [x for group in leaves for x in group]
    device = None
    for i, x in enumerate(flat):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"cuda_graph: leaf {i} (params, state, then args, in tree order) is a "
                            f"{type(x).__name__}; a CUDA graph replays device work only, so every "
                            "leaf must be a CUDA tensor (make it a tensor on the device)")
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph: leaf {i} (params, state, then args, in tree order) is on "
                             f"{x.device}; a CUDA graph replays device work only, so every leaf "
                             "must be on the CUDA device (move it there with .cuda())")
        if device is None:
            device = x.device
        elif x.device != device:
            raise ValueError(f"cuda_graph: leaves on {device} and {x.device}; one graph runs on "
                             "one device (capture one step per device)")
    if device is None:
        raise ValueError("cuda_graph: params, state and args hold no tensors; nothing to capture")
    return device


def _copy_in(k: int, tree: Any, spec: Any, into: list[Any]) -> None:
    leaves, got = tree_flatten(tree)
    what = ("params", "state")[k] if k < 2 else f"argument {k}"
    if got != spec:
        raise ValueError(f"cuda_graph: {what} has another tree structure than at capture "
                         f"({got} against {spec}); capture again for new structures")
    for i, (x, y) in enumerate(zip(leaves, into)):
        if not isinstance(x, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
            got_s = (f"{tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, torch.Tensor)
                     else type(x).__name__)
            raise ValueError(f"cuda_graph: leaf {i} of {what} is {got_s}, captured as "
                             f"{tuple(y.shape)} {y.dtype} on {y.device}; pass tensors of the "
                             "captured shapes and dtypes, or capture again")
    with torch.no_grad():
        _copy_into(into, leaves)
