"""The curvature capture while ``torch.compile`` traces (a whole step under :func:`funcopt.jit`).

Module hooks cannot be registered there and ``torch.autograd.grad`` cannot run, so
:func:`funcopt.func.capture_curvature` takes this route: a supported layer's calls are found by
its weight tensor in ``F.linear``/``F.conv2d``, the output shapes by a forward pass whose
arithmetic the compiler drops, and the gradients by ``torch.func.vjp`` in the params and in zero
probes added to the outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from funcopt.func.capture import LayerSpec

__all__: list[str] = []


def _unscale(t: Tensor | None, scale: Any) -> Tensor | None:
    """``t / scale``; 16-bit tensors are unscaled in float32 (they would underflow again)."""
    if t is None or scale is None:
        return t
    wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return wide / torch.as_tensor(scale, dtype=wide.dtype, device=wide.device)


class _Call(NamedTuple):
    """One capture's model call and loss: ``fn(model(*args), targets)``; ``sampled(out)``
    the Monte-Carlo loss (None for the empirical Fisher)."""

    model: nn.Module
    buffers: dict[str, Tensor]
    args: tuple
    targets: Tensor
    fn: Callable[[Tensor, Tensor], Tensor]
    sampled: Callable[[Tensor], Tensor] | None
    loss_scale: Any


class _Recorder(TorchFunctionMode):
    """Records the input and output of every ``F.linear``/``F.conv2d`` call whose weight is
    one of ``weights`` (``(tensor, layer name)`` pairs, matched by identity), and adds the
    call's probe to its output when ``probes`` is given (the traced capture)."""

    def __init__(self, weights: list[tuple[Tensor, str]], probes: dict | None,
                 records: dict[str, list]):
        super().__init__()
        self.weights, self.probes, self.records = weights, probes, records

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch._C._nn.linear or func is torch.conv2d:
            w = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
            for t, name in self.weights:
                if t is w:
                    calls = self.records[name]
                    if self.probes is not None:
                        out = out + self.probes[name][len(calls)]
                    calls.append((args[0], out))
                    break
        return out


def _run_traced(call: _Call, params: dict[str, Tensor], specs: dict[str, LayerSpec],
                modules: dict[str, nn.Module]) -> tuple[Tensor, dict, dict]:
    """The capture while ``torch.compile`` traces: a first pass (no autograd; the compiler
    drops its arithmetic, only its shapes are used) finds the output shape of every call of a
    supported layer, then ``torch.func.vjp`` of the loss in the params and in zero probes
    added to those outputs gives the gradients and ``g``. The layers' calls are found by their
    weights (layers that share one weight tensor are refused)."""

    missing = sorted(s.weight for s in specs.values() if s.weight not in params)
    if missing:
        raise ValueError(f"capture_curvature under torch.compile: params has no {missing}; "
                         "pass every layer's weight in params (named_parameters)")
    owners: dict[int, list[str]] = {}
    for name, module in modules.items():
        if isinstance(getattr(module, "weight", None), Tensor):
            owners.setdefault(id(module.weight), []).append(name)
    tied = [names for names in owners.values() if len(names) > 1 and set(names) & set(specs)]
    if tied:
        raise ValueError(f"capture_curvature under torch.compile: modules {tied} share one "
                         "weight tensor, which the compiled capture cannot tell apart; capture "
                         "them eagerly (outside torch.compile / fo.jit)")

    # the buffers the forward may update in place (BatchNorm's running statistics): each
    # pass gets copies, and the vjp pass's updated copies are written back once, as one
    # eager forward would leave them
    buffers = {**dict(call.model.named_buffers()), **call.buffers}

    def forward(leaves, probes, records, bufs, args):
        weights = [(leaves[s.weight], name) for name, s in specs.items()]
        with _Recorder(weights, probes, records):
            return functional_call(call.model, {**leaves, **bufs}, args)

    shapes: dict[str, list] = {name: [] for name in specs}
    with torch.no_grad():
        forward(params, None, shapes, {k: v.clone() for k, v in buffers.items()}, call.args)
    probes = {name: [torch.zeros_like(y) for _, y in calls] for name, calls in shapes.items()}
    scale = 1.0 if call.loss_scale is None else call.loss_scale

    def losses(leaves, probes):
        records: dict[str, list] = {name: [] for name in specs}
        bufs = {k: v.clone() for k, v in buffers.items()}
        out = forward(leaves, probes, records, bufs, call.args)
        value = call.fn(out, call.targets)
        wide = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
        terms = [wide * scale]
        if call.sampled is not None:
            sample = call.sampled(out)
            terms.append((sample.float() if sample.dtype != wide.dtype else sample) * scale)
        inputs = {name: [x.detach() for x, _ in calls] for name, calls in records.items()}
        return tuple(terms), (value.detach(), inputs, {k: v.detach() for k, v in bufs.items()})

    # with has_aux, vjp returns (outputs, vjp_fn, aux); its annotation lists two
    terms, vjp_fn, aux = torch.func.vjp(losses, params, probes, has_aux=True)  # type: ignore[misc]
    value, inputs, updated = aux
    with torch.no_grad():
        for k, v in updated.items():
            buffers[k].copy_(v)
    one, zero = torch.ones_like(terms[0]), torch.zeros_like(terms[0])
    grads, gys = vjp_fn((one,) if len(terms) == 1 else (one, zero))
    if len(terms) == 2:
        gys = vjp_fn((zero, one))[1]
    if call.loss_scale is not None:  # as _gradients
        grads = {k: (gr / call.loss_scale).to(gr.dtype) for k, gr in grads.items()}
        gys = {name: [_unscale(gy, call.loss_scale) for gy in gs] for name, gs in gys.items()}
    return value, grads, {name: list(zip(inputs[name], gys[name])) for name in specs}
