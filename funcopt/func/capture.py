"""Curvature capture for Kronecker-factored methods (KFAC, SINGD).

One forward and backward pass of a model, called through ``torch.func.functional_call`` on a
parameter dict, returns the loss, the gradients and, per supported layer, the layer inputs
``a`` and the gradients ``g`` of the loss with respect to the layer outputs. For a layer with
weight ``W`` (and bias ``b``, folded in as a last column of ones in ``a``)::

    grad [W, b] = g^T a        (exact for the "expand" approximation)

Weight sharing (a Linear layer applied over a sequence, a Conv2d over positions) follows
Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern Neural Network
Architectures" (NeurIPS 2023): ``"expand"`` treats every shared position as a row of its own;
``"reduce"`` averages ``a`` and sums ``g`` over the shared positions first.

The Kronecker factors of layer ``l`` are ``A = a^T a / rows(a)`` and
``G = g^T g * num_loss_terms`` (see :func:`kronecker_factors`); with a loss that is a mean
over ``N`` examples, ``num_loss_terms = N`` turns ``g`` (the gradient of the mean) back into
per-example gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from funcopt.func.capture_traced import _Call, _run_traced, _unscale

__all__ = ["LayerSpec", "LayerCurvature", "Captured", "supported_layers", "MonteCarloFisher",
           "capture_curvature", "kronecker_factors", "merge_curvature"]

_LOSSES = ("cross_entropy", "mse")
_FISHERS = ("empirical", "mc")
_APPROX = ("expand", "reduce")
_AVERAGES = (None, "batch", "batch+sequence")


class LayerSpec(NamedTuple):
    """A supported layer: its kind, parameter keys and Kronecker factor sizes.

    ``dim_in`` counts the bias column; ``A`` is ``dim_in x dim_in`` and ``G`` is
    ``dim_out x dim_out``.
    """

    kind: str            # "linear" or "conv2d"
    weight: str          # key of the weight in the params dict
    bias: str | None     # key of the bias, or None
    dim_in: int
    dim_out: int


class LayerCurvature(NamedTuple):
    """What one layer contributes: ``a`` (rows x dim_in), ``g`` (rows x dim_out) and the
    number of terms the loss was averaged over (1 for a summed loss)."""

    a: Tensor
    g: Tensor
    num_loss_terms: int


class Captured(NamedTuple):
    """The result of :func:`capture_curvature`."""

    loss: Tensor
    grads: dict[str, Tensor]
    layers: dict[str, LayerCurvature]
    unsupported: tuple[str, ...]   # modules with trained parameters that have no a/g


def _conv_unsupported_reason(m: nn.Conv2d) -> str | None:
    if m.groups != 1:
        return f"groups={m.groups} (only groups=1 is supported)"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only 'zeros' is supported)"
    return None


def supported_layers(model: nn.Module, params: dict[str, Tensor] | None = None
                     ) -> tuple[dict[str, LayerSpec], dict[str, str]]:
    """The supported layers of ``model`` and the unsupported modules that hold parameters.

    Returns ``(layers, unsupported)``: ``layers`` maps module names to :class:`LayerSpec`
    (Linear, and Conv2d with ``groups=1`` and zero padding); ``unsupported`` maps the names
    of other modules with parameters (in ``params`` when given) to the reason. The
    ``out_proj`` of an ``nn.MultiheadAttention`` is unsupported: the attention applies its
    weight functionally and never calls the module.
    """
    keys = None if params is None else set(params)
    layers: dict[str, LayerSpec] = {}
    unsupported: dict[str, str] = {}
    named = list(model.named_modules())  # one walk of the module tree
    inside_attention = {f"{n}.out_proj" if n else "out_proj" for n, m in named
                        if isinstance(m, nn.MultiheadAttention)}
    for name, m in named:
        own = [f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)]
        if keys is not None:
            own = [k for k in own if k in keys]
        if not own:
            continue
        prefix = f"{name}." if name else ""
        w = prefix + "weight"
        b = prefix + "bias" if prefix + "bias" in own else None
        reason = None
        if name in inside_attention:
            reason = ("MultiheadAttention applies its weight functionally (the module is never "
                      "called), so no curvature can be captured for it")
        elif isinstance(m, nn.Conv2d):
            reason = _conv_unsupported_reason(m)
        elif not isinstance(m, nn.Linear):
            reason = f"{type(m).__name__} has no Kronecker-factored curvature here"
        if reason is None and w not in own:
            reason = "its weight is not among the trained parameters"
        if reason is not None:
            unsupported[name] = reason
            continue
        dim_in = m.weight[0].numel() + (b is not None)
        layers[name] = LayerSpec("conv2d" if isinstance(m, nn.Conv2d) else "linear", w, b,
                                 dim_in, m.weight.shape[0])
    return layers, unsupported


def _conv_patches(x: Tensor, m: nn.Conv2d) -> Tensor:
    """Unfold a conv input (N, C, H, W) into patches (N, positions, C*kh*kw)."""
    padding: int | tuple[int, ...]
    if not isinstance(m.padding, str):
        padding = m.padding
    elif m.padding == "valid":
        padding = 0
    else:  # "same" with stride 1
        pads = []
        for k, d in zip(m.kernel_size, m.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(f"{m}: padding='same' with uneven padding is not supported; "
                                 "pass explicit integer padding")
            pads.append(total // 2)
        padding = tuple(pads)
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
    return cols.transpose(1, 2)


def _process(kind: str, m: nn.Module, x: Tensor, gy: Tensor, approx: str, has_bias: bool,
             loss_average: str | None) -> LayerCurvature:
    """Turn a layer's input and output gradient into (rows x dim) matrices."""
    if kind == "linear" and x.dim() == 2:  # one position per example: both approximations
        a, g = x, gy                       # are the rows themselves (no views dispatched)
        if has_bias:
            a = F.pad(a, (0, 1), value=1.0)  # the column of ones, in one op
        return LayerCurvature(a, g, {None: 1, "batch": g.shape[0],
                                     "batch+sequence": g.shape[0]}[loss_average])
    if kind == "conv2d":
        assert isinstance(m, nn.Conv2d)  # kind comes from supported_layers
        a = _conv_patches(x, m)                       # (N, P, C*k*k)
        g = gy.flatten(2).transpose(1, 2)            # (N, P, C_out)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])   # (N, S, d_in)
        g = gy.reshape(gy.shape[0], -1, gy.shape[-1])
    n, positions = g.shape[0], g.shape[1]
    if approx == "expand":
        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    else:
        a, g = a.mean(1), g.sum(1)
    if has_bias:
        a = F.pad(a, (0, 1), value=1.0)
    terms = {None: 1, "batch": n, "batch+sequence": n * positions}[loss_average]
    return LayerCurvature(a, g, terms)


def _loss_fn(loss: str | Callable) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(loss):
        return loss
    return F.cross_entropy if loss == "cross_entropy" else F.mse_loss


def _sample_targets(loss: str, out: Tensor, generator: torch.Generator | None) -> Tensor:
    """Targets drawn from the model's predictive distribution (for the MC Fisher)."""
    out = out.detach()
    if loss == "cross_entropy":
        probs = torch.softmax(out.float(), dim=-1).reshape(-1, out.shape[-1])
        y = torch.multinomial(probs, 1, generator=generator).reshape(out.shape[:-1])
        return y
    # (f - y)^2 has Hessian 2I in f; y ~ N(f, 1/2) gives E[grad grad^T] = 2I.
    noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
    return out + noise * 0.5 ** 0.5


@dataclass(frozen=True)
class MonteCarloFisher:
    """``capture_curvature(..., fisher=MonteCarloFisher(generator))``: ``g`` from the loss on
    targets sampled from the model's predictive distribution (one Monte-Carlo sample of the
    Fisher). ``fisher="mc"`` is ``MonteCarloFisher()``.

    Args:
      generator: the ``torch.Generator`` of the samples; None (default) for torch's global one.
    """

    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError("MonteCarloFisher: generator must be a torch.Generator or None; got "
                            f"{type(self.generator).__name__}")


def _monte_carlo(fisher: Any) -> MonteCarloFisher | None:
    """The Monte-Carlo options of ``fisher`` ("empirical", "mc" or a MonteCarloFisher)."""
    if isinstance(fisher, MonteCarloFisher):
        return fisher
    if isinstance(fisher, str) and fisher in _FISHERS:
        return MonteCarloFisher() if fisher == "mc" else None
    raise ValueError(f"fisher={fisher!r}: pass 'empirical', 'mc' or "
                     "MonteCarloFisher(generator)")


def _check_options(loss, fisher, kfac_approx, loss_average) -> None:
    if not callable(loss) and loss not in _LOSSES:
        raise ValueError(f"loss={loss!r}: pass one of {_LOSSES} or a callable(outputs, targets)")
    if _monte_carlo(fisher) is not None and callable(loss):
        raise ValueError("fisher='mc' needs a known likelihood: pass loss='cross_entropy' or "
                         "'mse' (a custom loss works with fisher='empirical')")
    if kfac_approx not in _APPROX:
        raise ValueError(f"kfac_approx={kfac_approx!r}: pass 'expand' or 'reduce'")
    if loss_average not in _AVERAGES:
        raise ValueError(f"loss_average={loss_average!r}: pass None, 'batch' or "
                         "'batch+sequence'")



def _weighted_sum(xs: list[Tensor], weights: list[float]) -> Tensor:
    """``sum_i weights[i] * xs[i]``, accumulated in order."""
    total = xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        total = total + x * w
    return total


def _gradients(value: Tensor, leaves: list[Tensor], probes: list[Tensor],
               sampled: Callable[[], Tensor] | None, loss_scale: Any
               ) -> tuple[Sequence[Tensor | None], Sequence[Tensor | None]]:
    """Gradients of ``loss_scale * value`` for ``leaves`` and of the (sampled) loss for the
    probes, divided by ``loss_scale`` again (None where a leaf does not reach the loss)."""
    grads: Sequence[Tensor | None]
    gys: Sequence[Tensor | None]
    def scaled_by(t: Tensor) -> Tensor:  # no op (and no autograd node) without a scale
        if loss_scale is None:
            return t
        with torch.enable_grad():
            return t * loss_scale

    wide = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    scaled = scaled_by(wide)
    if sampled is None:
        found = torch.autograd.grad(scaled, leaves + probes, allow_unused=True)
        grads, gys = found[:len(leaves)], found[len(leaves):]
    else:
        grads = torch.autograd.grad(scaled, leaves, retain_graph=True, allow_unused=True)
        with torch.enable_grad():
            sample = sampled()
            scaled_sample = scaled_by(sample.float() if sample.dtype != wide.dtype else sample)
        gys = torch.autograd.grad(scaled_sample, probes, allow_unused=True)
    if loss_scale is not None:  # grads keep the parameters' dtype, as GradScaler.unscale_
        grads = [None if gr is None else (gr / loss_scale).to(gr.dtype) for gr in grads]
        gys = [_unscale(gy, loss_scale) for gy in gys]
    return grads, gys


def capture_curvature(
    model: nn.Module, params: dict[str, Tensor], inputs: Any, targets: Tensor, *,
    loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
    fisher: str | MonteCarloFisher = "empirical", kfac_approx: str = "expand",
    loss_average: str | None = "batch", buffers: dict[str, Tensor] | None = None,
    strict: bool = False, loss_scale: float | Tensor | None = None,
) -> Captured:
    """Loss, gradients and per-layer ``(a, g)`` from one pass of ``model`` on ``params``.

    Runs ``functional_call(model, {**params, **buffers}, inputs)``, computes
    ``loss(outputs, targets)`` and its gradients with respect to ``params`` and to the output
    of every supported layer (:func:`supported_layers`).

    Args:
      model: the module (its own parameters are not used; ``params`` replace them).
      params: dict of tensors keyed as ``model.named_parameters()``.
      inputs: the model input (a tensor, or a tuple of positional inputs).
      targets: class indices (``"cross_entropy"``) or values (``"mse"``).
      loss: ``"cross_entropy"`` (``F.cross_entropy``), ``"mse"`` (``F.mse_loss``), both with
        mean reduction, or a callable ``loss(outputs, targets) -> scalar``. Default
        ``"cross_entropy"``.
      fisher: ``"empirical"`` (``g`` from the loss on ``targets``), ``"mc"`` or
        :class:`MonteCarloFisher` (``g`` from the loss on targets sampled from the model's
        predictive distribution: one Monte-Carlo sample of the Fisher, drawn with the
        object's ``generator``; the gradients still use ``targets``). Default ``"empirical"``.
      kfac_approx: ``"expand"`` or ``"reduce"`` for weight-shared layers. Default ``"expand"``.
      loss_average: what the loss is a mean over: ``"batch"`` (N terms), ``"batch+sequence"``
        (N times the shared positions of each layer) or ``None`` (a sum). Default ``"batch"``.
      buffers: optional dict of buffers for ``functional_call``.
      strict: raise when a module with parameters is unsupported (default: report it in
        ``Captured.unsupported``; its gradients are still returned).
      loss_scale: mixed precision (AMP): backpropagate ``loss_scale * loss`` so that 16-bit
        gradients do not underflow, then unscale: ``grads`` are divided by it in the
        parameters' dtype (as ``GradScaler.unscale_``), ``g`` in float32 when it is 16-bit.
        What comes back is unscaled, so the transforms' update needs no scaler. Pass e.g.
        ``scaler.get_scale()`` of a ``torch.amp.GradScaler`` or a manually adjusted power of
        two; on overflow (non-finite ``grads``) skip the step and lower the scale, e.g. with
        :func:`funcopt.apply_if_finite`. Default ``None`` (no scaling).

    Returns:
      :class:`Captured` ``(loss, grads, layers, unsupported)``; ``grads`` has the keys of
      ``params``; ``layers[name] = LayerCurvature(a, g, num_loss_terms)``. A module called
      several times contributes one block of rows per call.

    Under ``torch.compile(fullgraph=True)`` (e.g. a whole step under :func:`funcopt.jit`) the
    same numbers come from another route, since module hooks cannot be registered and
    ``torch.autograd.grad`` cannot run there: a supported layer's calls are found by its
    weight tensor in ``F.linear``/``F.conv2d`` (layers that share one weight tensor are
    refused there, with a ValueError; a weight used outside its module is counted at each
    use there, at its module's calls only in eager mode), the output shapes by a forward
    pass whose arithmetic the compiler drops, and the gradients by ``torch.func.vjp`` in the params and in zero probes added to
    the outputs. The model runs twice there, so random layers (dropout) draw their masks as
    compiled code does, not as the eager capture would at the same seed.

    Example::

        params = {k: v.detach() for k, v in model.named_parameters()}
        cap = fo.func.capture_curvature(model, params, x, y)
        updates, state = tx.update(cap.grads, state, params, curvature=cap)
    """
    _check_options(loss, fisher, kfac_approx, loss_average)
    specs, unsupported = supported_layers(model, params)
    if strict and unsupported:
        raise ValueError("capture_curvature: unsupported modules with parameters: "
                         + ", ".join(f"{k} ({v})" for k, v in unsupported.items()))
    traced = torch.compiler.is_compiling()
    # the traced capture looks for weights shared with any module; the hooked one needs the
    # supported layers only
    modules = (dict(model.named_modules()) if traced
               else {name: model.get_submodule(name) for name in specs})
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    call = _Call(model, {**(buffers or {})}, args, targets, _loss_fn(loss),
                 _sampler(loss, fisher), loss_scale)
    # torch.compile cannot trace module hooks being registered nor torch.autograd.grad: there
    # the layers are found by their weights and differentiated with torch.func.vjp
    run = _run_traced if traced else _run_hooked
    value, grads, records = run(call, params, specs, modules)
    layers = {}
    for name, spec in specs.items():
        parts = [_process(spec.kind, modules[name], x, gy, kfac_approx, spec.bias is not None,
                          loss_average) for x, gy in records[name]]
        if parts:
            layers[name] = LayerCurvature(_stack_rows([p.a for p in parts]),
                                          _stack_rows([p.g for p in parts]),
                                          parts[0].num_loss_terms)
    return Captured(value.detach(), grads, layers, tuple(unsupported))


def _stack_rows(blocks: list[Tensor]) -> Tensor:
    """The row blocks of a layer's calls one under another (a single call's block as it is,
    with no copy)."""
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _sampler(loss: Any, fisher: Any) -> Callable[[Tensor], Tensor] | None:
    """``out -> loss(out, targets sampled from out)`` for the Monte-Carlo Fisher, else None."""
    mc = _monte_carlo(fisher)
    if mc is None or not isinstance(loss, str):  # _check_options: mc needs a named loss
        return None
    fn, generator = _loss_fn(loss), mc.generator
    return lambda out: fn(out, _sample_targets(loss, out, generator))


def _run_hooked(call: _Call, params: dict[str, Tensor], specs: dict[str, LayerSpec],
                modules: dict[str, nn.Module]) -> tuple[Tensor, dict, dict]:
    """The eager capture: forward hooks record every supported layer's input and catch the
    gradient of its output (a tensor hook: no op added to the model; it still sees the
    output before an in-place activation changes it) while ``torch.autograd.grad``
    differentiates the loss for the params. With a Monte-Carlo Fisher, ``g`` comes from a
    second pass, for zero probes added to the outputs instead."""
    records: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in specs}
    caught: dict[int, Tensor] = {}
    probing = call.sampled is not None

    def hook(name):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["input"]  # Linear/Conv2d: forward(input)
            if probing:
                probe = output.new_zeros(()).requires_grad_(True).expand(output.shape)
                records[name].append((x.detach(), probe))
                return output + probe
            if output.requires_grad:
                output.register_hook(functools.partial(caught.__setitem__, id(output)))
            records[name].append((x.detach(), output))
            return None
        return fn

    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    handles = [modules[name].register_forward_hook(hook(name), with_kwargs=True) for name in specs]
    try:
        with torch.enable_grad():
            out = functional_call(call.model, {**leaves, **call.buffers}, call.args)
    finally:
        for h in handles:
            h.remove()
    with torch.enable_grad():
        value = call.fn(out, call.targets)
    keys = list(leaves)
    probes = [p for name in specs for _, p in records[name]] if probing else []
    sample_loss = call.sampled
    sampled = None if sample_loss is None else (lambda: sample_loss(out))
    found, gys = _gradients(value, [leaves[k] for k in keys], probes, sampled, call.loss_scale)
    grads = {k: torch.zeros_like(leaves[k]) if gr is None else gr for k, gr in zip(keys, found)}
    if not probing:
        gys = [_unscale(caught.get(id(o)), call.loss_scale) for name in specs
               for _, o in records[name]]
    it = iter(gys)
    pairs = {name: [(x, _or_zeros(next(it), p)) for x, p in records[name]] for name in specs}
    return value, grads, pairs


def _or_zeros(gy: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if gy is None else gy


def kronecker_factors(layer: LayerCurvature, dtype: torch.dtype | None = None
                      ) -> tuple[Tensor, Tensor]:
    """``A = a^T a / rows(a)`` and ``G = g^T g * num_loss_terms`` for one layer.

    ``dtype`` (default: that of ``a``) is the precision the products are formed in.
    """
    a = layer.a if dtype is None else layer.a.to(dtype)
    g = layer.g if dtype is None else layer.g.to(dtype)
    return a.T @ a / a.shape[0], (g.T @ g) * layer.num_loss_terms


def merge_curvature(captures: list[Captured] | tuple[Captured, ...], *,
                    loss_average: str | None = "batch") -> Captured:
    """One :class:`Captured` for the union of micro-batches, as if captured on their
    concatenation (gradient accumulation).

    With a mean loss over ``N_m`` terms in micro-batch ``m`` and ``N = sum_m N_m``: rows of
    ``a`` are stacked; rows of ``g`` are stacked after scaling by ``N_m / N`` (the gradient
    of the mean over all ``N`` terms); ``num_loss_terms = N``; ``grads`` and ``loss`` are the
    ``N_m / N``-weighted means. With a summed loss (``loss_average=None``) ``g`` rows are
    stacked unscaled and ``grads``, ``loss`` are summed. So the KFAC factors and SINGD's
    ``H_K``, ``H_C`` of the merged capture equal those of one capture on the concatenated
    batch (exactly, for the "expand" approximation and equal per-example positions).

    Args:
      captures: the micro-batches' captures (one or more), same model and options.
      loss_average: the value passed to :func:`capture_curvature` (default ``"batch"``).

    Use with :func:`funcopt.multi_steps` (which runs the inner transform on every micro-step
    and keeps only the last result): keep ``merged = merge_curvature([merged, cap])`` across
    the micro-steps of one step and pass ``curvature=merged``. Memory grows with the rows
    kept (for convolutions, examples times positions).
    """
    captures = list(captures)
    if not captures or not all(isinstance(c, Captured) for c in captures):
        raise TypeError("merge_curvature: pass a non-empty list of Captured objects (results "
                        "of funcopt.func.capture_curvature)")
    if loss_average not in _AVERAGES:
        raise ValueError(f"loss_average={loss_average!r}: pass None, 'batch' or "
                         "'batch+sequence', as given to capture_curvature")
    names = set(captures[0].layers)
    if any(set(c.layers) != names or set(c.grads) != set(captures[0].grads) for c in captures):
        raise ValueError("merge_curvature: the captures cover different layers or parameters; "
                         "capture every micro-batch with the same model and params keys")
    first = next(iter(names), None)
    terms = [c.layers[first].num_loss_terms if first else 1 for c in captures]
    weights = [1.0] * len(captures) if loss_average is None else [n / sum(terms) for n in terms]
    layers = {}
    for name in captures[0].layers:
        parts = [c.layers[name] for c in captures]
        total = 1 if loss_average is None else sum(p.num_loss_terms for p in parts)
        scale = [1.0 if loss_average is None else p.num_loss_terms / total for p in parts]
        layers[name] = LayerCurvature(torch.cat([p.a for p in parts]),
                                      torch.cat([p.g * w for p, w in zip(parts, scale)]), total)
    grads = {k: _weighted_sum([c.grads[k] for c in captures], weights)
             for k in captures[0].grads}
    loss = _weighted_sum([c.loss for c in captures], weights)
    unsupported = tuple(dict.fromkeys(u for c in captures for u in c.unsupported))
    return Captured(loss, grads, layers, unsupported)
