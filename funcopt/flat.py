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

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from funcopt.base import PyTree, tree_flatten, tree_map, tree_unflatten
from funcopt.engine import differentiating, ops
from funcopt.func.ravel import concat, group_by_dtype_device, split

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
    order = group_by_dtype_device(leaves)
    shapes = [x.shape for x in leaves]
    sizes = [[leaves[i].numel() for i in g] for g in order]
    buffers = concat([x.detach() for x in leaves], order)
    single = len(buffers) == 1
    n_leaves = len(leaves)  # unravel must not hold the original leaves alive
    # the tree with each leaf's index in place of the leaf: unravel maps over it rather than
    # unflattening a PyTreeSpec, which torch.compile cannot take from outside the step
    skeleton = tree_unflatten(treedef, list(range(n_leaves)))

    def unravel(flat: Any) -> PyTree:
        bufs = (flat,) if single else tuple(flat)
        if len(bufs) != len(order) or any(b.dim() != 1 or b.numel() != sum(s) for b, s in zip(bufs, sizes)):
            raise ValueError(
                "unravel: the flat input does not match the raveled tree: expected "
                f"{len(order)} 1-D buffer(s) of sizes {[sum(s) for s in sizes]}"
            )
        parts = split(bufs, order, shapes, [None] * n_leaves)
        return tree_map(lambda i: parts[i], skeleton)

    return (buffers[0] if single else buffers), unravel


def donated(step: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
    """Run a pure ``step(params, state, *args) -> (params, state)`` and write its results back
    into the input tensors, returning the inputs.

    The numbers are those of ``step``; only the storage differs. Results are written in their
    inputs' layout, so a later step whose arithmetic depends on strides (a matrix product of a
    transposed basis, as in SOAP) can round differently from the pure step's (by about 1e-7
    in float32 over 30 SOAP steps). Under ``torch.compile`` the
    copies fuse into the step's kernels, so an optimizer step reads and writes each byte once
    and keeps fixed addresses (what CUDA graphs need). Use it only when nothing else holds the
    old values: they are overwritten. For the same reason the params and the state must not
    share memory, and a result may alias an input only at its own position (a leaf passed
    through unchanged). Each result must have its input's tree position, shape, dtype and
    device, and autograd must not record the step (run it under ``torch.no_grad()``; results
    written in place would be cut out of the graph). In eager mode each of these raises a
    clear error; under compile only the tree structure is checked.
    """

    def wrapped(params: Any, state: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        new_params, new_state = step(params, state, *args, **kwargs)
        (dst_p, spec_p), (dst_s, spec_s) = tree_flatten(params), tree_flatten(state)
        (src_p, got_p), (src_s, got_s) = tree_flatten(new_params), tree_flatten(new_state)
        for what, got, spec in (("params", got_p, spec_p), ("state", got_s, spec_s)):
            if got != spec:
                raise ValueError(f"donated: the step returned {what} of another tree structure "
                                 f"({got}) than it was given ({spec}); a donated step writes "
                                 "each result into its input, so use the pure step")
        dst, src = dst_p + dst_s, src_p + src_s
        compiling = torch.compiler.is_compiling()
        if not compiling:
            _check_donatable(dst, src)
        if compiling and any(s.shape != d.shape or s.dtype != d.dtype for d, s in zip(dst, src)):
            # known while tracing; torch.compile reports it as an "observed exception" whose
            # cause carries this text (fo.jit returns it as a plain ValueError)
            raise ValueError("donated: a result is not of its input's shape and dtype; writing "
                             "it back would cast or broadcast it, so use the pure step")
        with torch.no_grad():
            if compiling:
                # one copy per leaf fuses into the step's own kernels; a single foreach copy
                # made Inductor emit a combined kernel that ran at 1.56x the bandwidth floor on
                # an H100 (1e9 parameters), against 1.03-1.09x this way
                # (benchmarks/compile_variants.py, results in benchmarks/RESULTS.md)
                for d, s in zip(dst, src):
                    d.copy_(s)
            else:
                _copy_into(dst, src)
        return params, state

    return wrapped


def _copy_into(dst: list[Any], src: list[Any]) -> None:
    """``dst[i].copy_(src[i])`` as one foreach copy, skipping the pairs that are one tensor
    already (an inner donated step, or the captured tensors passed back in)."""
    moved = [(d, s) for d, s in zip(dst, src) if d is not s]
    if moved:
        ops.copy_([d for d, _ in moved], [s for _, s in moved])


def _check_donatable(dst: list[Any], src: list[Any]) -> None:
    """Copying ``src[i]`` into ``dst[i]`` is only the pure step's result when every leaf is a
    tensor, each result has its input's shape, dtype and device, autograd does not need the
    results, and no ``dst`` tensor is read after it was written: no two inputs overlap in memory
    and no result overlaps another position's input."""
    where = "(params then state, in tree order)"
    for i, (d, s) in enumerate(zip(dst, src)):
        for kind, x in (("input", d), ("result", s)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"donated: {kind} leaf {i} {where} has type {type(x).__name__}; a "
                                "donated step writes each result into its input tensor, so "
                                "every leaf must be a tensor (or use the pure step)")
        if s.shape != d.shape or s.dtype != d.dtype or s.device != d.device:
            raise ValueError(f"donated: result {i} {where} is {tuple(s.shape)} {s.dtype} on "
                             f"{s.device}, its input {tuple(d.shape)} {d.dtype} on {d.device}; "
                             "writing it back would cast or broadcast it, so use the pure step")
    if differentiating(dst + src):
        raise ValueError("donated: autograd records this step (a leaf requires grad, or it runs "
                         "under torch.func), and results written in place are cut out of the "
                         "graph; run the step under torch.no_grad(), or differentiate the pure "
                         "step")
    spans = _check_disjoint(dst, "donated")
    starts = [(dev, start) for dev, start, _, _ in spans]
    for i, s in enumerate(src):
        if not s.numel() or s is dst[i]:
            continue
        lo, hi = _span(s)
        k = bisect.bisect_left(starts, (s.device, hi)) - 1  # the last input starting below hi
        if k >= 0 and spans[k][0] == s.device and spans[k][2] > lo:
            j = spans[k][3]
            if j == i and s.data_ptr() == dst[i].data_ptr() and s.stride() == dst[i].stride():
                continue  # its own input, viewed alike: copying it changes nothing
            raise ValueError(f"donated: result {i} {where} overlaps input {j}, which is "
                             f"overwritten by then{'' if j != i else ' (in another layout)'}; "
                             "return a copy (e.g. x.clone()) or use the pure step")


def _overlapping(tensors: Sequence[torch.Tensor]) -> tuple[list[tuple[Any, int, int, int]],
                                                         tuple[int, int] | None]:
    """The tensors' byte spans sorted by device and start, as ``(device, start, end,
    position)``, and the positions of the first two that share memory (None if none do)."""
    spans = sorted((t.device, *_span(t), i) for i, t in enumerate(tensors) if t.numel())
    for (dev0, _, end0, i), (dev1, start1, _, j) in zip(spans, spans[1:]):
        if dev0 == dev1 and start1 < end0:
            return spans, (i, j)
    return spans, None


def _check_disjoint(dst: list[Any], who: str) -> list[tuple[Any, int, int, int]]:
    """Refuse inputs that share memory (writing one would overwrite another); returns the
    inputs' spans (see :func:`_overlapping`)."""
    spans, pair = _overlapping(dst)
    if pair is not None:
        raise ValueError(f"{who}: inputs {pair[0]} and {pair[1]} (params then state, in tree "
                         "order) share memory, so writing one overwrites the other; give each "
                         "leaf its own tensor (e.g. clone the state's) or use the pure step")
    return spans


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` that ``t``'s elements lie in."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


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
    themselves, e.g. fill them in place, to avoid it). A captured tree passed back is taken as
    is, without looking at its leaves (that would cost more host time than the replay on many
    leaves): do not put new tensors into it (``batch["x"] = x``); copy into its tensors
    (``batch["x"].copy_(x)``) or pass a new container. ``params`` and ``state`` are left
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
        copies = [tree_map(_warmup_copy, t) for t in (params, state)]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            inner(copies[0], copies[1], *args)
    torch.cuda.current_stream(device).wait_stream(side)
    del copies
    graph = _capture(inner, trees, side, "cuda_graph", "Run it without cuda_graph")

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


def _capture(inner: Callable[..., Any], trees: tuple[Any, ...], side: torch.cuda.Stream, who: str,
             fix: str, pool: Any = None) -> torch.cuda.CUDAGraph:
    """Record ``inner(*trees)`` as a CUDA graph (nothing runs until ``replay``)."""
    graph = torch.cuda.CUDAGraph()
    try:
        # captured on the stream that ran the warm-up: cuBLAS keeps a workspace per stream, and
        # one first made inside a capture lives in that graph's private memory, where eager work
        # or another graph on the same stream would find it (pytorch/pytorch#193402)
        with torch.cuda.graph(graph, pool=pool, stream=side):
            inner(*trees)
    except RuntimeError as e:
        if "captur" not in str(e):
            raise
        raise RuntimeError(
            f"{who}: the step cannot be captured as a CUDA graph; it reads a device value on "
            "the host (.item(), a data-dependent branch, a host-side check) or synchronises. "
            f"{fix}, or remove the host read. The CUDA error was: {e}") from e
    return graph


def _warmup_copy(x: torch.Tensor) -> torch.Tensor:
    """A copy that a compiled step's guards take for ``x``: the same strides and
    ``requires_grad``, so that the capture does not compile the step again."""
    y = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device).copy_(x)
    return y.requires_grad_(x.requires_grad)


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
