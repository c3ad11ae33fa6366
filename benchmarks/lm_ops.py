"""Dispatched tensor operations and host syncs per Levenberg-Marquardt step, funcopt against
torch-levenberg-marquardt, on the two problems of ``benchmarks/lm_peers.py``.

    PYTHONPATH=.:/path/to/torch-lm python benchmarks/lm_ops.py [--steps 10] [--top 25]

An eager LM step on a small network is bound by the host: each dispatched op costs ~10-20 us
of Python and launch time on a GPU whatever its size, and each host read of a tensor
(``.item()``, ``bool()``, ``.tolist()``, a ``torch.linalg`` call that checks its ``info``)
waits for the device. The counts hardly depend on the device (funcopt reads the Jacobian's
column statistics in cache-sized blocks on the CPU, in one pass on a GPU), so they are taken
on the CPU by default: every ATen op that reaches the dispatcher (views included; the "compute" column leaves out
views and metadata ops, which launch no kernel) is counted under a
``torch.utils._python_dispatch.TorchDispatchMode``, grouped by op name and by the innermost
funcopt (or torch-lm) source line that issued it. Syncs are the ops that read a value on the
host (``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``float()``; ``_linalg_check_errors``;
``nonzero``) plus calls of ``Tensor.tolist``. Also printed: the median ms per step (on the CPU
with ``--threads`` threads, default 1, or on ``--device cuda``), and the solves per step.

funcopt runs ``fo.levenberg_marquardt(fo.mse_residuals(fwd, per_sample=True), solver="cholesky")``
(``cross_entropy_residuals`` for digits), the peer ``LevenbergMarquardtModule(...,
solve_method="cholesky")``; both from the same weights, counted over ``--steps`` steps after
``--warmup`` steps and reported per step.
"""

from __future__ import annotations

import argparse
import collections
import copy
import logging
import os
import statistics
import sys
import time
import traceback

import torch
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_peers import make_problem  # noqa: E402

import funcopt as fo  # noqa: E402

SYNC_OPS = {"aten._local_scalar_dense", "aten._linalg_check_errors", "aten.nonzero"}
VIEW_OPS = {"aten.view", "aten._unsafe_view", "aten.slice", "aten.select", "aten.transpose",
            "aten.t", "aten.expand", "aten.unsqueeze", "aten.squeeze", "aten.permute",
            "aten.as_strided", "aten.alias", "aten.detach", "aten.diagonal", "aten.split",
            "aten.split_with_sizes", "aten.unbind", "aten.reshape", "aten._reshape_alias",
            "aten.lift_fresh", "aten.unfold", "aten.lift_fresh_copy", "aten.empty_like",
            "aten.empty", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
            "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.sym_storage_offset",
            "aten.is_same_size", "aten.resolve_conj", "aten.resolve_neg", "aten.t_",
            "aten._conj", "aten.conj", "aten._neg_view", "aten.real", "aten.mT", "aten.mH"}
MARKERS = ("funcopt" + os.sep, "torch_levenberg_marquardt" + os.sep, "lm_ops.py", "lm_peers.py")


def _origin() -> str:
    """``file:line`` of the innermost frame in funcopt or torch-lm (or a benchmark script)."""
    for fr in reversed(traceback.extract_stack()[:-3]):
        if any(m in fr.filename for m in MARKERS):
            name = fr.filename
            for m in MARKERS:
                if m in name:
                    name = name[name.index(m):]
                    break
            return f"{name}:{fr.lineno} ({fr.name})"
    return "?"


class OpCounter(TorchDispatchMode):
    """Counts ATen ops by name and by source line, and the host reads among them."""

    def __init__(self, lines: bool = True):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.lines: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self.want_lines = lines

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        key = f"aten.{name}" if not name.startswith("aten.") else name
        self.ops[key] += 1
        if self.want_lines:
            where = _origin()
            self.lines[where] += 1
            if key in SYNC_OPS:
                self.syncs[f"{key} @ {where}"] += 1
        elif key in SYNC_OPS:
            self.syncs[key] += 1
        return func(*args, **(kwargs or {}))


class _CountToList:
    """Counts ``Tensor.tolist`` calls (a host read that dispatches no ATen op on the CPU)."""

    def __init__(self, counter: OpCounter):
        self.counter, self.orig = counter, torch.Tensor.tolist

    def __enter__(self):
        orig, counter = self.orig, self.counter

        def tolist(t):
            counter.syncs[f"Tensor.tolist @ {_origin()}"] += 1
            return orig(t)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.orig  # type: ignore[method-assign]


def funcopt_stepper(name, model, xtr, ytr):
    """``(step, attempts)``: one ``update`` + ``apply_updates`` of funcopt's dense LM per call
    of ``step``; ``attempts()`` reads the solves of the last one (not part of the step)."""
    fwd = lambda p, x: functional_call(model, p, (x,))
    adapter = fo.mse_residuals if name == "sin" else fo.cross_entropy_residuals
    tx = fo.levenberg_marquardt(adapter(fwd, per_sample=True), solver="cholesky")
    box = {"params": {k: v.detach().clone() for k, v in model.named_parameters()}}
    box["state"] = tx.init(box["params"])

    def step() -> None:
        upd, box["state"] = tx.update(None, box["state"], box["params"], batch=(xtr, ytr))
        box["params"] = fo.apply_updates(box["params"], upd)

    return step, lambda: int(box["state"].attempts)


def peer_stepper(name, model, xtr, ytr):
    """``(step, attempts)``: one ``training_step`` of torch-levenberg-marquardt (Cholesky)."""
    from lm_scale import load_peer

    training, tlm_loss = load_peer()
    logging.getLogger("torch_levenberg_marquardt").setLevel(logging.ERROR)
    loss = tlm_loss.MSELoss() if name == "sin" else tlm_loss.CrossEntropyLoss()
    lm = training.LevenbergMarquardtModule(copy.deepcopy(model), loss_fn=loss,
                                           solve_method="cholesky")
    box: dict = {}

    def step() -> None:
        box["logs"] = lm.training_step(xtr, ytr)[3]

    return step, lambda: int(box["logs"]["attempts"])


def measure(make, name, steps, warmup, device="cpu"):
    """``(counter, solves, ms)``: the ops of ``steps`` steps after ``warmup``, their solves,
    then the median ms of ``steps`` more steps (the device synchronised around each)."""
    model, xtr, ytr, _, _ = make_problem(name, device)
    step, attempts = make(name, model, xtr, ytr)
    for _ in range(warmup):
        step()
    counter, solves = OpCounter(), 0
    for _ in range(steps):
        with counter, _CountToList(counter):
            step()
        solves += attempts()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return counter, solves, 1e3 * statistics.median(times)


def report(label, counter, solves, ms, steps, top, device="cpu"):
    total = sum(counter.ops.values())
    views = sum(v for k, v in counter.ops.items() if k in VIEW_OPS)
    syncs = sum(counter.syncs.values())
    print(f"## {label}: {total / steps:.1f} ops/step ({(total - views) / steps:.1f} compute, "
          f"{views / steps:.1f} views/metadata), {syncs / steps:.1f} syncs/step, "
          f"{solves / steps:.2f} solves/step, {ms:.2f} ms/step ({device}, "
          f"{torch.get_num_threads()} CPU threads)")
    print("   top ops per step:")
    for k, v in counter.ops.most_common(top):
        print(f"     {v / steps:7.1f}  {k}")
    print("   top source lines per step:")
    for k, v in counter.lines.most_common(top):
        print(f"     {v / steps:7.1f}  {k}")
    print("   syncs per step:")
    for k, v in counter.syncs.most_common():
        print(f"     {v / steps:7.1f}  {k}")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--problems", default="sin,digits")
    ap.add_argument("--packages", default="funcopt,torch-lm")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the steps run (the counts are the same but for the CPU's "
                         "cache-sized blocks)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {args.steps} steps counted after "
          f"{args.warmup}\n")
    makers = {"funcopt": funcopt_stepper, "torch-lm": peer_stepper}
    for name in args.problems.split(","):
        for pkg in args.packages.split(","):
            counter, solves, ms = measure(makers[pkg], name, args.steps, args.warmup,
                                          args.device)
            report(f"{name} {pkg}", counter, solves, ms, args.steps, args.top, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
