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
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from funcopt.base import PyTree, tree_flatten, tree_map, tree_unflatten
from funcopt.engine import differentiating, functorch_active, ops
from funcopt.func.ravel import concat, group_by_dtype_device, split

__all__ = ["ravel", "donated", "cuda_graph", "jit"]


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


def jit(step: Callable[..., tuple[Any, Any]], *, graph: bool | None = None,
        warmup: int = 2) -> Callable[..., tuple[Any, Any]]:
    """The fast form of a pure ``step(params, state, *args) -> (params, state)``: compiled,
    donated and, on a CUDA device, captured as a CUDA graph. Like ``jax.jit`` with the params
    and the state donated.

    Returns ``fast``, called like ``step``; ``params, state = fast(params, state, *args)`` gives
    ``step``'s numbers (up to the compiler's rounding) written into the tensors of ``params``
    and ``state``, and returns those same trees. What it does:

    * ``torch.compile(fo.donated(step), fullgraph=True)``: the step's element-wise work fuses
      into few kernels that write the new values into the inputs' memory, so a step needs no
      memory beyond the params, gradients and state (plus the step's own non-element-wise
      temporaries). Give element-wise methods (AdamW, SGD, Lion ...) parameters stored flat
      with :func:`ravel` and each step is one kernel over one buffer.
    * on CUDA (``graph=None`` or ``True``): the first ``warmup`` calls per shape of ``args`` run
      the compiled step for real (on a side stream, as capture needs), the next one captures
      it as a CUDA graph and replays it, and later calls replay it: one launch per step,
      whatever the number of leaves and kernels. Unlike :func:`cuda_graph` no warm-up copy of
      params and state is made (the warm-up calls are real steps). A new shape of ``args``
      (a last, smaller batch) warms up and captures its own graph; all of them share one memory
      pool; so does each new value of a non-tensor argument (a Python number is baked into
      the graph: pass a 0-d tensor for a value that changes every step). Tensors in ``args``
      are copied into the captured ones (pass the tensors ``fast``
      was captured with, filled in place, to save the copy); params and state are the captured
      trees as long as you pass back what ``fast`` returned.
    * ``graph=False`` (or a CPU device): no graph; each call runs the compiled step.

    The params and the state are overwritten (donated): keep using the trees ``fast``
    returns. Every leaf of ``params`` and ``state`` must be a tensor, on one device, and none
    may share memory with another or require grad (checked whenever the trees are not the ones
    ``fast`` returned last, with a clear error; a result of another tree, shape or dtype than
    its input is refused too). A jitted step cannot be differentiated or vmapped (it writes into
    its inputs): apply ``torch.func`` to the pure step. The step may
    take gradients itself (``torch.func.grad`` of a loss of ``unravel(flat)``, as in the
    README's fast path) or be given them in ``args``. A step that reads device values on the
    host (SOAP's and PSGD Kron's eager refresh decisions) cannot be captured: the error says
    to pass ``graph=False``.
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int):
        raise TypeError(f"jit: warmup={warmup!r}; give an int >= 1, the number of calls that "
                        "run before capture")
    if warmup < 1:
        raise ValueError(f"jit: warmup={warmup}; at least 1 call must run before capture "
                         "(compilation and lazy CUDA set-up cannot be captured)")
    if graph is not None and graph is not True and graph is not False:
        raise TypeError(f"jit: graph={graph!r}; pass None (a graph on CUDA), True or False")
    # a code object of its own: torch.compile caches compiled steps per code object and stops
    # compiling one after a few closures (torch._dynamo's recompile limit), which a process
    # making many jitted steps (a sweep) would reach
    core = _donating(step)
    fresh = types.FunctionType(core.__code__.replace(), core.__globals__, "jitted_step",
                               core.__defaults__, core.__closure__)
    compiled = torch.compile(fresh, fullgraph=True)
    graphs: dict[Any, tuple[torch.cuda.CUDAGraph, tuple[Any, ...], list[Any], list[list[Any]]]] = {}
    warm: dict[Any, int] = {}
    pool: list[Any] = []
    last: list[Any] = [None, None, None]  # the trees fast returned last, and their device

    def run(params: Any, state: Any, *args: Any) -> tuple[Any, Any]:
        with torch.no_grad():
            out = compiled(params, state, *args)
        if isinstance(out[0], str):  # the step's results cannot be written into its inputs
            raise ValueError(out[1])
        return out

    def fast(params: Any, state: Any, *args: Any) -> tuple[Any, Any]:
        if functorch_active():
            raise ValueError("jit: a jitted step writes its results into its inputs, which "
                             "torch.func transforms and autograd cannot follow; differentiate "
                             "or vmap the pure step instead")
        if params is last[0] and state is last[1]:
            device = last[2]
        else:  # new trees: check them (the ones fast returned were checked)
            device = _check_jit_inputs(params, state)
        if graph and device.type != "cuda":
            raise ValueError(f"jit: graph=True, but the params are on {device}; CUDA graphs "
                             "need a CUDA device (pass graph=None to capture only there)")
        if device.type != "cuda" or graph is False:
            out = run(params, state, *args)
        else:
            out = _graphed_call(run, compiled, (params, state, *args), device,
                                (graphs, warm, pool), warmup)
        last[:] = [out[0], out[1], device]
        return out

    return fast


def _donating(step: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
    """``step`` whose results are written into its inputs (what ``fo.donated`` does), for
    tracing: a result that cannot be written back (another number of leaves, shape, dtype or
    device) returns ``("refused", message)`` instead of raising, since an error raised while
    ``torch.compile`` traces reaches the caller only as an unclear "observed exception"."""

    def core(params: Any, state: Any, *args: Any) -> tuple[Any, Any]:
        new_params, new_state = step(params, state, *args)
        dst_p, dst_s = tree_flatten(params)[0], tree_flatten(state)[0]
        src_p, src_s = tree_flatten(new_params)[0], tree_flatten(new_state)[0]
        # leaves are written back by position: their number, shapes and dtypes must match (the
        # tree specs themselves are not compared here, which some torch versions cannot trace
        # for custom nodes; the results are returned in the inputs' trees)
        if len(src_p) != len(dst_p) or len(src_s) != len(dst_s):
            return ("refused", "jit: the step returned params or state of another tree structure "
                    "(another number of leaves) than it was given; a jitted step writes each "
                    "result into its input, so it must return trees of its inputs' structure")
        for i, (d, s) in enumerate(zip(dst_p + dst_s, src_p + src_s)):
            if not isinstance(s, torch.Tensor) or s.shape != d.shape or s.dtype != d.dtype \
                    or s.device != d.device:
                return ("refused", f"jit: result {i} (params then state, in tree order) is not "
                        "of its input's shape, dtype and device; writing it back would cast or "
                        "broadcast it: return results like their inputs")
        for d, s in zip(dst_p + dst_s, src_p + src_s):
            d.copy_(s)  # one copy per leaf fuses into the step's kernels (see fo.donated)
        return params, state

    return core


def _graphed_call(run: Callable[..., Any], compiled: Callable[..., Any], trees: tuple[Any, ...],
                  device: torch.device, memo: tuple[dict, dict, list], warmup: int) -> Any:
    """One call of a jitted step on CUDA: replay the graph captured for these argument shapes,
    or run a real warm-up step, or capture (see :func:`jit`)."""
    graphs, warm, pool = memo
    arg_leaves, arg_spec = tree_flatten(trees[2:])
    try:
        key = (arg_spec, tuple((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor)
                               else (type(x), x) for x in arg_leaves))
        entry = graphs.get(key)
    except TypeError:
        raise TypeError("jit: an argument holds a value that is neither a tensor nor hashable; "
                        "a CUDA graph bakes in every non-tensor argument, so pass tensors (or "
                        "numbers and strings, each value capturing a graph of its own)") from None
    if entry is not None:
        g, captured_trees, specs, captured = entry
        for k, (new, old) in enumerate(zip(trees, captured_trees)):
            if new is not old:
                _copy_in(k, new, specs[k], captured[k])
        g.replay()
        return captured_trees[0], captured_trees[1]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    if warm.get(key, 0) < warmup:
        warm[key] = warm.get(key, 0) + 1
        with torch.cuda.stream(side):
            out = run(*trees)
        torch.cuda.current_stream(device).wait_stream(side)
        return out
    if not pool:
        pool.append(torch.cuda.graph_pool_handle())
    with torch.no_grad():
        g = _capture(compiled, trees, side, "jit", "Pass graph=False", pool[0])
    torch.cuda.current_stream(device).wait_stream(side)
    flat = [tree_flatten(t) for t in trees]
    graphs[key] = (g, trees, [f[1] for f in flat], [f[0] for f in flat])
    g.replay()
    return trees[0], trees[1]


def _check_jit_inputs(params: Any, state: Any) -> torch.device:
    """The one device of ``params`` and ``state``, after checking that every leaf is a tensor
    there and that no two share memory (a donated step overwrites them)."""
    leaves = tree_flatten(params)[0] + tree_flatten(state)[0]
    device = None
    for i, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"jit: leaf {i} (params then state, in tree order) is a "
                            f"{type(x).__name__}; a jitted step writes each result into its "
                            "input tensor, so every leaf must be a tensor")
        if device is not None and x.device != device:
            raise ValueError(f"jit: leaves on {device} and {x.device}; a jitted step runs on one "
                             "device (move the params and state there)")
        if x.requires_grad:
            raise ValueError(f"jit: leaf {i} (params then state, in tree order) requires grad; a "
                             "jitted step writes its results into its inputs, which autograd "
                             "cannot follow: pass detached tensors, or differentiate the pure step")
        device = x.device
    if device is None:
        raise ValueError("jit: params and state hold no tensors; there is nothing to update")
    _check_disjoint(leaves, "jit")
    return device


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
