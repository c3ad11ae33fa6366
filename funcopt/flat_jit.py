"""``fo.jit``: a pure step made fast in one call (compiled, donated, captured).

:func:`jit` puts together what :mod:`funcopt.flat` offers one by one: ``torch.compile``,
donation of the inputs (:func:`funcopt.donated`) and, on CUDA, one graph per argument shape
(:func:`funcopt.cuda_graph`).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

from funcopt.base import tree_flatten
from funcopt.engine import functorch_active
from funcopt.flat import (
    _capture,
    _check_disjoint,
    _copy_in,
)

__all__ = ["jit"]


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
