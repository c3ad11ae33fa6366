r"""A Triton kernel for the eager AdamW step on CUDA tensors.

:func:`funcopt.adamw` is ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``.
Run op by op, a pure eager step makes about twenty passes over memory. Where the kernel applies,
:func:`with_triton_adamw` replaces the chain's ``update`` by one kernel that reads
:math:`g, m, v` (and :math:`\theta` for the decay) once and writes the update :math:`u` and the
new moments once (seven passes), with the chain's own numbers:

.. math::
    m_t = \beta_1 m + (1-\beta_1) g,\quad v_t = \beta_2 v + (1-\beta_2) g^2,\quad
    d = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon},\quad
    u = -\eta\,(d + \lambda\theta).

Given the parameters (outside inference mode: the record is kept by version counters, which
inference tensors lack; none is recorded for parameters that are inference tensors), the
kernel also writes :math:`\theta + u` (rounded as torch's add) into a fourth buffer and
records it for :func:`funcopt.apply_updates` (``funcopt.base.register_sum``):
the usual ``apply_updates(params, updates)`` of these very, unmodified updates and parameters
then returns it without a pass of its own, so a pure step reads :math:`\theta, g, m, v` and
writes :math:`u, \theta', m, v` once (eight passes, against ten with a separate add; an update
that is never applied costs the one extra write, and keeps :math:`\theta'` alive while it lives).

Every leaf computes in float32 and rounds as the chain does: :math:`d` and :math:`d +
\lambda\theta` are rounded to the update's dtype before the next operation, the moments to
theirs (float32 for float16 leaves). The bias corrections are computed in float64 from the
step counter on the device (no host synchronisation), the learning rate is read from the
state's 0-d tensor (or the schedule's value) on the device.

The kernel runs only where it gives the chain's answer: every leaf (updates, params, moments) a
plain contiguous CUDA tensor on one device, all of one dtype (float32, bfloat16 or float16: a
tree of several dtypes takes the chain's foreach path, which rounds differently), with its moments in the
dtype init gives them; nothing requires grad; no ``torch.compile`` trace, ``torch.func``
transform, forward-mode AD or CUDA-graph capture is running; Triton imports; the
hyperparameters ``b1, b2, eps, weight_decay`` are numbers (the learning rate may be a number,
a tensor that does not require grad or a schedule). Anything else, and any state or tree the
chain would reject, runs the chain's own update unchanged (which raises its own errors).

The leaves are one launch over a table of blocks, so many small leaves cost one launch, not
one each. Full blocks and each leaf's last, partial block are
launched apart, so that full blocks load and store without masks (vectorised). Each output
(the updates, the new first and second moments) is one new buffer whose leaves are contiguous
views of the leaves' shapes, each starting 16-byte aligned: the outputs never share memory
with the inputs, and a leaf kept alive keeps its whole buffer alive. The layout of a tree of
shapes and its block tables are cached by device and shapes.
"""

from __future__ import annotations

import array
import contextlib
import functools
import importlib
import itertools
import math
import operator
from typing import Any, NamedTuple

import optree
import torch

from funcopt.base import GradientTransformation, Tensor, register_sum
from funcopt.engine import current_learning_rate, is_tracing
from funcopt.transforms.first_order import ScaleByAdamState
from funcopt.transforms.scaling import ScaleByLearningRateState
from funcopt.transforms.weight_decay import AddDecayedWeightsState

__all__ = ["with_triton_adamw"]

_DEVICE_TYPES: tuple[str, ...] = ("cuda",)  # tests add "cpu" (Triton's interpreter)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024  # elements per program
_NUM_WARPS = 4
_PAD = 8  # each leaf of a flat output starts at a multiple of 8 elements (16 bytes or more)
_LAYOUTS: dict[Any, Any] = {}  # _Layout by (device, shapes)
_MAX_LAYOUTS = 16
tl: Any = None  # triton.language, set when the kernel is first built (Triton is optional)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def with_triton_adamw(tx: GradientTransformation, learning_rate: Any, *, b1: Any, b2: Any,
                      eps: Any, weight_decay: Any) -> GradientTransformation:
    """``tx`` (the chain :func:`funcopt.adamw` builds with these hyperparameters, no mask,
    AMSGrad, Nesterov, ``mu_dtype`` or ``eps_root``) with an ``update`` that runs the Triton
    kernel where it applies and ``tx.update`` elsewhere; ``tx`` itself unless ``b1``, ``b2``,
    ``eps`` and ``weight_decay`` are numbers."""
    if torch.compiler.is_compiling() or not all(map(_is_number, (b1, b2, eps, weight_decay))):
        return tx
    # the betas as the kernel computes with them (float32, as torch's fused Adam)
    b1f, b2f = torch.tensor([b1, b2], dtype=torch.float32).tolist()
    hyper = (b1f, b2f, float(eps), float(weight_decay))
    n_states = 2 if weight_decay == 0 else 3
    chain_update = tx.update

    def update(updates, state, params=None, **extra):
        got = _fast_update(updates, state, params, learning_rate, hyper, n_states)
        return chain_update(updates, state, params, **extra) if got is None else got

    return GradientTransformation(tx.init, update)


@functools.cache
def _triton() -> Any:
    """The ``triton`` module, or None where it does not import."""
    try:
        triton = importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # not installed, or broken for this torch
        return None
    return triton


def _fast_update(updates: Any, state: Any, params: Any, learning_rate: Any,
                 hyper: tuple[float, float, float, float], n_states: int) -> Any:
    """``(updates, state)`` computed by the kernel, or None where it does not apply."""
    if (is_tracing() or type(state) is not tuple or len(state) != n_states
            or type(state[0]) is not ScaleByAdamState
            or type(state[-1]) is not ScaleByLearningRateState
            or (n_states == 3 and type(state[1]) is not AddDecayedWeightsState)):
        return None
    g, treedef = optree.tree_flatten(updates)
    if not g or type(state[0].mu) is not list or type(state[0].nu) is not list:
        return None
    if params is None:
        if n_states == 3:
            return None  # the chain raises: add_decayed_weights needs params
        p = g
    else:
        p, p_def = optree.tree_flatten(params)
        if p_def != treedef:
            return None
    adam, lr_state = state[0], state[-1]
    fit = _leaves_fit(g, p, adam.mu, adam.nu)
    if fit is None:
        return None
    shapes, every = fit
    device = g[0].device
    counts = [s.count for s in state]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None  # a captured step would keep this step's tables
    if not all(_scalar_on(c, device, torch.int64) for c in counts) or _triton() is None:
        return None
    lr = current_learning_rate(learning_rate, lr_state.learning_rate, lr_state.count)
    if not _scalar_on(lr, device, torch.float32):
        return None
    layout = _layout(shapes, device)
    addrs = _addresses(every, layout, g[0].element_size(), adam.mu[0].element_size())
    if addrs is None:
        return None
    new_counts = torch._foreach_add(counts, 1)
    # the sum is recorded by version counters, which inference tensors (made in this mode) lack
    with_sum = params is not None and not torch.is_inference_mode_enabled()
    u, mu, nu = _run(g, p, adam.mu, adam.nu, layout, addrs, new_counts[0], lr, hyper, with_sum)
    new: list[Any] = [ScaleByAdamState(new_counts[0], mu, nu)]
    if n_states == 3:
        new.append(AddDecayedWeightsState(new_counts[1]))
    new.append(ScaleByLearningRateState(new_counts[-1], lr))
    return optree.tree_unflatten(treedef, u), tuple(new)


def _scalar_on(x: Any, device: torch.device, dtype: torch.dtype) -> bool:
    return (type(x) is Tensor and x.dim() == 0 and x.dtype == dtype and x.device == device
            and not x.requires_grad)


_dtype_of, _shape_of = operator.attrgetter("dtype"), operator.attrgetter("shape")
_data_of = operator.attrgetter("data")
_device_of, _requires_grad = operator.attrgetter("device"), operator.attrgetter("requires_grad")


def _leaves_fit(g: list[Any], p: list[Any], mu: list[Any],
                nu: list[Any]) -> tuple[tuple[torch.Size, ...], list[Tensor]] | None:
    """The leaves' shapes and the list ``p + g + mu + nu`` where every leaf is one the kernel
    computes exactly as the chain (module docstring), else None. Each test is one C-level
    ``map`` over all leaves, so that a thousand leaves cost little host time; the element
    alignment of the addresses is checked by :func:`_addresses`."""
    n = len(g)
    if len(p) != n or len(mu) != n or len(nu) != n:
        return None
    first = g[0]
    if type(first) is not Tensor or first.device.type not in _DEVICE_TYPES:
        return None
    every = [*p, *g, *mu, *nu]
    if set(map(type, every)) != {Tensor}:
        return None
    dtype = first.dtype  # one dtype, as the chain's fused path: a mixed tree takes its foreach one
    wide = torch.float32 if dtype == torch.float16 else dtype
    dtypes = list(map(_dtype_of, every))
    if dtype not in _DTYPES or dtypes != [dtype] * (2 * n) + [wide] * (2 * n):
        return None
    shapes = list(map(_shape_of, every))
    if shapes[n:2 * n] * 4 != shapes or set(map(_device_of, every)) != {first.device}:
        return None
    if (any(map(_requires_grad, every)) or not all(map(Tensor.is_contiguous, every))
            or any(map(Tensor.is_neg, every))
            or any(map(torch._C._functorch.is_functorch_wrapped_tensor, every))):
        return None
    return tuple(shapes[n:2 * n]), every


class _Layout(NamedTuple):
    """What the kernel needs to know of a tree of leaf shapes on a device (cached by
    :func:`_layout`). A flat output buffer of ``total`` elements is split into ``sizes`` (each
    leaf's numel rounded up to ``_PAD``, so that every leaf starts 16-byte aligned); the leaves
    in ``fixes`` (not 1-D, or padded) are made as ``buf.as_strided(shape, stride, offset)``
    instead of the split's chunk. ``launched``: the leaves with elements (an int64 index, or
    None for all); ``starts``: their element offsets in a flat buffer (int64, on the CPU);
    ``full``, ``tail``: their work tables on the device (see :func:`_blocks`)."""

    sizes: list[int]
    total: int
    fixes: list[tuple[int, tuple[int, ...], tuple[int, ...], int]]
    launched: Tensor | None
    starts: Tensor
    full: Tensor
    tail: Tensor


def _layout(shapes: tuple[torch.Size, ...], device: torch.device) -> _Layout:
    """The :class:`_Layout` of ``shapes`` on ``device``: built once, then read from a small
    cache keyed by ``(device, shapes)``, which determine every field."""
    key = (device, shapes)
    hit = _LAYOUTS.get(key)
    if hit is not None:
        return hit
    numels = [math.prod(s) for s in shapes]
    sizes = [-(-k // _PAD) * _PAD for k in numels]
    offsets = list(itertools.accumulate(sizes, initial=0))
    fixes = [(i, tuple(s), torch.empty(s, device="meta").stride(), offsets[i])
             for i, s in enumerate(shapes) if len(s) != 1 or sizes[i] != numels[i]]
    launched = [i for i, k in enumerate(numels) if k]
    full, tail = _blocks(tuple(numels[i] for i in launched), device)
    layout = _Layout(sizes, offsets[-1], fixes,
                     None if len(launched) == len(numels) else torch.tensor(launched, dtype=torch.int64),
                     torch.tensor([offsets[i] for i in launched], dtype=torch.int64), full, tail)
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.pop(next(iter(_LAYOUTS)))
    _LAYOUTS[key] = layout
    return layout


def _addresses(every: list[Tensor], layout: _Layout, size: int, wide: int) -> Tensor | None:
    """The addresses of the launched leaves of ``p, g, mu, nu`` (``every``), shape
    ``(4, leaves)`` int64; None where one is not a multiple of its element size (``size`` for
    ``p, g``, ``wide`` for the moments)."""
    addrs = torch.frombuffer(array.array("q", map(Tensor.data_ptr, every)), dtype=torch.int64)
    addrs = addrs.view(4, -1)
    if layout.launched is not None:
        addrs = addrs[:, layout.launched]
    sizes = torch.tensor([[size], [size], [wide], [wide]])
    return None if bool((addrs % sizes).any()) else addrs


def _outputs(layout: _Layout, like: Tensor) -> tuple[Tensor, list[Tensor]]:
    """A new flat buffer of ``like``'s dtype and device and its leaves: contiguous views at
    the layout's offsets, each of its leaf's shape (one split, plus one view per fixed leaf)."""
    buf = torch.empty(layout.total, dtype=like.dtype, device=like.device)
    leaves = list(torch.split_with_sizes(buf, layout.sizes))
    for i, shape, stride, offset in layout.fixes:
        leaves[i] = buf.as_strided(shape, stride, offset)
    return buf, leaves


def _run(g: list[Tensor], p: list[Tensor], mu: list[Tensor], nu: list[Tensor], layout: _Layout,
         addrs: Tensor, t: Tensor, lr: Tensor, hyper: tuple[float, float, float, float],
         with_sum: bool) -> tuple[list[Tensor], ...]:
    """New leaves ``u, mu, nu`` at step ``t`` (the new count): each role one new flat buffer
    (:func:`_outputs`), written by one launch (two where there are full and partial blocks).
    ``with_sum``: the kernel also writes ``p + u`` into a fourth buffer, registered with
    ``funcopt.base.register_sum`` for the :func:`funcopt.apply_updates` that follows."""
    b1, b2, eps, wd = hyper
    likes = (g[0], mu[0], nu[0], g[0]) if with_sum else (g[0], mu[0], nu[0])
    bufs, outs = zip(*(_outputs(layout, like) for like in likes))
    device = g[0].device
    neg_bc = torch.expm1(_log_betas(b1, b2, device) * t)  # -(1 - beta^t), float64
    if len(layout.starts):
        low = addrs.argmin(1)
        picked = low if layout.launched is None else layout.launched[low]
        inputs = [leaves[i] for leaves, i in zip((p, g, mu, nu), picked.tolist())]
        with _on(device):
            _launch([*inputs, *bufs], addrs, low, layout, neg_bc, lr, b1, b2, eps, wd, device)
    if with_sum:
        # each leaf of the sum its own version counter, as torch's adds give
        register_sum(bufs[0], p, outs[0], list(map(_data_of, outs[3])))
    return tuple(outs[:3])


@functools.lru_cache(maxsize=64)
def _log_betas(b1: float, b2: float, device: torch.device) -> Tensor:
    """``[log b1, log b2]`` in float64 on ``device`` (copied there once)."""
    logs = [math.log(b) if b > 0 else -math.inf for b in (b1, b2)]
    return torch.tensor(logs, dtype=torch.float64).to(device)


def _on(device: torch.device) -> Any:
    """The context that makes ``device`` current for the launch (Triton launches there)."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch(bases: list[Tensor], addrs: Tensor, low: Tensor, layout: _Layout, neg_bc: Tensor,
            lr: Tensor, b1: float, b2: float, eps: float, wd: float, device: torch.device) -> None:
    """Launch the kernel over the launched leaves. ``bases``: the leaf of lowest address of
    ``p, g, mu, nu`` (``addrs``, its index ``low``) and the flat output buffers ``u, mu, nu``
    (and ``p + u``, at ``u``'s offsets); each leaf's row of the table holds the element offsets
    of its seven tensors from the first seven."""
    sizes = torch.tensor([b.element_size() for b in bases[:4]])[:, None]
    rel = (addrs - addrs.gather(1, low[:, None])) // sizes
    n = rel.shape[1]
    table = torch.cat([rel, layout.starts.expand(3, n)]).t().contiguous()
    table = table.to(device, non_blocking=True)  # staged at once: the CPU tensor may go
    aligned = not bool((addrs % 16).any()) and all(b.data_ptr() % 16 == 0 for b in bases[4:])
    # in elements of each tensor's dtype: p, g, u in the parameters' and the moments in
    # theirs (float32 for float16 parameters)
    align, align_m = (16 // bases[0].element_size(), 16 // bases[2].element_size()) \
        if aligned else (1, 1)
    kernel = _kernel(device.type)
    has_sum = len(bases) == 8
    for work, masked in ((layout.full, False), (layout.tail, True)):
        if len(work):
            kernel[(len(work),)](*bases[:7], bases[7 if has_sum else 4], table, work, neg_bc, lr,
                                 b1, b2, 1 - b1, 1 - b2, eps, wd, HAS_WD=wd != 0,
                                 HAS_SUM=has_sum, PTX=device.type == "cuda", MASKED=masked,
                                 ALIGN=align, ALIGN_M=align_m,
                                 BLOCK=_BLOCK,
                                 num_warps=_NUM_WARPS)


def _blocks(numels: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """The work tables of the launched leaves: rows ``(leaf, first element, numel)``, full
    blocks in the first table, each leaf's partial last block in the second."""
    n = torch.tensor(numels, dtype=torch.int64)
    nfull = n // _BLOCK
    leaf = torch.repeat_interleave(torch.arange(len(numels)), nfull)
    before = torch.repeat_interleave(torch.cumsum(nfull, 0) - nfull, nfull)  # blocks of leaves before
    full = torch.stack([leaf, (torch.arange(len(leaf)) - before) * _BLOCK, n[leaf]], 1)
    has_tail = (n % _BLOCK).nonzero().flatten()
    tail = torch.stack([has_tail, nfull[has_tail] * _BLOCK, n[has_tail]], 1)
    return full.to(device).contiguous(), tail.to(device).contiguous()


@functools.cache
def _kernel(device_type: str) -> Any:
    """The compiled kernel (CUDA), or Triton's interpreter of it (CPU tensors, for tests)."""
    global tl
    triton = _triton()
    tl = triton.language
    if device_type == "cpu":
        interpreter = importlib.import_module("triton.runtime.interpreter")
        return interpreter.InterpretedFunction(_adamw_kernel)
    return triton.jit(_adamw_kernel)


def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, u_ptr, mo_ptr, vo_ptr, s_ptr, table, work,
                  neg_bc, lr_ptr, b1, b2, c1, c2, eps, wd, HAS_WD: tl.constexpr,
                  HAS_SUM: tl.constexpr, PTX: tl.constexpr, MASKED: tl.constexpr, ALIGN: tl.constexpr,
                  ALIGN_M: tl.constexpr, BLOCK: tl.constexpr):
    """One block of one leaf: the row ``work[program]`` names the leaf, the first element and
    the leaf's numel; ``table[leaf]`` the element offsets of its seven tensors from the seven
    base pointers ``p .. vo``; ``HAS_SUM``: ``p + u`` is also written at ``s_ptr`` (``u``'s
    offsets), rounded as torch's add (``PTX``: by an ``add.rn``, which the compiler does not
    contract with the product that made ``u``; the interpreter has no contraction). Uses
    ``tl`` functions present since Triton 3.0."""
    pid = tl.program_id(0)
    leaf = tl.load(work + 3 * pid)
    start = tl.load(work + 3 * pid + 1)
    end = tl.load(work + 3 * pid + 2)
    row = table + 7 * leaf
    i = start + tl.arange(0, BLOCK)
    o_p = tl.max_contiguous(tl.multiple_of(tl.load(row) + i, ALIGN), BLOCK)
    o_g = tl.max_contiguous(tl.multiple_of(tl.load(row + 1) + i, ALIGN), BLOCK)
    o_m = tl.max_contiguous(tl.multiple_of(tl.load(row + 2) + i, ALIGN_M), BLOCK)
    o_v = tl.max_contiguous(tl.multiple_of(tl.load(row + 3) + i, ALIGN_M), BLOCK)
    o_u = tl.max_contiguous(tl.multiple_of(tl.load(row + 4) + i, ALIGN), BLOCK)
    o_mo = tl.max_contiguous(tl.multiple_of(tl.load(row + 5) + i, ALIGN_M), BLOCK)
    o_vo = tl.max_contiguous(tl.multiple_of(tl.load(row + 6) + i, ALIGN_M), BLOCK)
    mask = i < end
    if MASKED:
        g = tl.load(g_ptr + o_g, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + o_m, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + o_v, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + o_g).to(tl.float32)
        m = tl.load(m_ptr + o_m).to(tl.float32)
        v = tl.load(v_ptr + o_v).to(tl.float32)
    bc1 = (0.0 - tl.load(neg_bc)).to(tl.float32)
    bc2 = (0.0 - tl.load(neg_bc + 1)).to(tl.float32)
    # torch's fused Adam: fma(b1, m, fma(-b1, g, g)); c1 = 1 - b1 (exact in float32 for
    # b1 >= 1/2), so c1 * g is fma(-b1, g, g) without relying on the compiler forming an fma
    m = b1 * m + c1 * g
    v = b2 * v + c2 * (g * g)
    # torch's fused kernel with lr = -1 on a zero parameter; IEEE division and square root
    # (sqrt_rn, div_rn) as in torch's CUDA build (Triton's / and sqrt are approximate)
    step_size = tl.div_rn(-1.0, bc1)
    denom = tl.div_rn(tl.sqrt_rn(v), tl.sqrt_rn(bc2)) + eps
    d = 0.0 - tl.div_rn(step_size * m, denom)
    d = d.to(u_ptr.dtype.element_ty).to(tl.float32)  # scale_by_adam's output dtype
    if HAS_WD or HAS_SUM:
        if MASKED:
            q = tl.load(p_ptr + o_p, mask=mask, other=0.0).to(tl.float32)
        else:
            q = tl.load(p_ptr + o_p).to(tl.float32)
    if HAS_WD:
        d = (d + wd * q).to(u_ptr.dtype.element_ty).to(tl.float32)  # add_decayed_weights
    u = (d * (0.0 - tl.load(lr_ptr))).to(u_ptr.dtype.element_ty)  # scale_by_learning_rate
    if HAS_SUM:  # p + u as torch adds: u rounded first, so never an fma with the product
        if PTX:
            s = tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f",
                                          [q, u.to(tl.float32)], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            s = q + u.to(tl.float32)
        s = s.to(s_ptr.dtype.element_ty)
    if MASKED:
        tl.store(u_ptr + o_u, u, mask=mask)
        tl.store(mo_ptr + o_mo, m.to(mo_ptr.dtype.element_ty), mask=mask)
        tl.store(vo_ptr + o_vo, v.to(vo_ptr.dtype.element_ty), mask=mask)
        if HAS_SUM:
            tl.store(s_ptr + o_u, s, mask=mask)
    else:
        tl.store(u_ptr + o_u, u)
        tl.store(mo_ptr + o_mo, m.to(mo_ptr.dtype.element_ty))
        tl.store(vo_ptr + o_vo, v.to(vo_ptr.dtype.element_ty))
        if HAS_SUM:
            tl.store(s_ptr + o_u, s)
