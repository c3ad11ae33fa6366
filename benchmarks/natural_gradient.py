"""Step time and optimizer-state memory: funcopt SINGD/KFAC vs the singd package vs torch SGD/AdamW.

    python benchmarks/natural_gradient.py [--device cuda] [--width 512] [--batch 128]
        [--steps 20] [--structures dense diagonal] [--out benchmarks/RESULTS_natural_gradient.md]

Every method runs a full training step on the same MLP (784-width-width-10) and batch:
forward, backward (for funcopt: ``capture_curvature``, which also records the layer
statistics) and the optimizer step. Reported: median step time over ``--steps`` steps after
3 warm-up steps (CUDA-synchronised), and the bytes held in optimizer state. The preconditioner
is refreshed every step (T=1), the worst case for the natural-gradient methods, except in the
``T=10`` rows: their time is the mean over a multiple of 10 steps timed as one block (the
refresh amortised).

``fo.jit`` rows run the whole step ``step(params, state, x, y, refresh)`` (capture, update,
apply) under :func:`funcopt.jit`: compiled with ``fullgraph=True``, params and state donated
and, on CUDA, captured as a CUDA graph; ``refresh`` is decided by the loop on the host. Their
compilation and capture run before the timing. In ``kfac (T=10, fo.jit)`` the refresh steps
run eagerly (see :func:`bench_funcopt`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import optree
import torch
import torch.nn.functional as F
from torch import nn

import funcopt as fo


def model_for(width: int, device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10)).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, steps, device, mean=False):
    """Median step time in ms over ``steps`` steps after 3 warm-up steps; with ``mean``, the
    mean over ``steps`` steps timed as one block."""
    times = []
    for i in range(3 if mean else steps + 3):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    if mean:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        return 1e3 * (time.perf_counter() - t0) / steps
    return 1e3 * statistics.median(times)


def tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in optree.tree_leaves(tree)
               if isinstance(t, torch.Tensor))


def bench_torch(make_opt, model, x, y, steps, device):
    model = copy.deepcopy(model)
    opt = make_opt(model)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    ms = timed(step, steps, device)
    state = [v for s in opt.state.values() for v in s.values()]
    for attr in ("Ks", "Cs", "m_Ks", "m_Cs"):  # the singd package keeps these outside .state
        for m in getattr(opt, attr, {}).values():
            state.extend(t for _, t in m.named_tensors())
    return ms, tensor_bytes(state)


def bench_funcopt(tx, model, x, y, steps, device, T=1, jit=False):
    """A funcopt step, eager or under ``fo.jit``. With ``T > 1`` (and under ``fo.jit``) the
    loop passes ``refresh`` (it knows its step number on the host), so the transform does not
    read its step counter on the host (on a GPU, a synchronisation every step). With ``T > 1`` under ``fo.jit`` only the
    steps between refreshes are jitted and the refresh steps run eagerly: KFAC's compiled
    refresh computes the eigh fallback of every Cholesky factorisation (to pick it on the
    device), and ``torch.linalg.eigh`` reads its error code on the host, which a CUDA graph
    cannot capture."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)

    def pure(params, state, x, y, refresh=None):
        cap = fo.func.capture_curvature(model, params, x, y)
        extra = {} if refresh is None else {"refresh": refresh}
        upd, state = tx.update(cap.grads, state, params, curvature=cap, **extra)
        return fo.apply_updates(params, upd), state

    fast = fo.jit(pure) if jit else pure
    box = {"params": params, "state": state, "i": 0}

    def step():
        refresh = box["i"] % T == 0
        run = pure if refresh and T > 1 else fast
        box["params"], box["state"] = run(box["params"], box["state"], x, y,
                                          refresh if jit or T > 1 else None)
        box["i"] += 1

    for _ in range(3 * T + 3 if jit else 0):  # compile, warm up and capture every graph
        step()
    box["i"] = 0
    steps = -(-steps // T) * T
    ms = timed(step, steps, device, mean=T > 1)
    return ms, tensor_bytes(box["state"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--structures", nargs="+", default=["dense", "diagonal", "block30diagonal",
                                                          "triltoeplitz"])
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    model = model_for(args.width, device)
    x = torch.randn(args.batch, 784, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    rows = []
    rows.append(("torch SGD (momentum 0.9)", *bench_torch(
        lambda m: torch.optim.SGD(m.parameters(), 1e-2, momentum=0.9), model, x, y,
        args.steps, device)))
    rows.append(("torch AdamW", *bench_torch(
        lambda m: torch.optim.AdamW(m.parameters(), 1e-3), model, x, y, args.steps, device)))
    rows.append(("funcopt kfac (T=1)", *bench_funcopt(
        fo.kfac(model, 1e-3, momentum=0.9, T=1), model, x, y, args.steps, device)))
    for jit in (False, True):
        rows.append((f"funcopt kfac (T=10{', fo.jit' if jit else ''})", *bench_funcopt(
            fo.kfac(model, 1e-3, momentum=0.9, T=10), model, x, y, args.steps, device,
            T=10, jit=jit)))
    try:
        from singd.optim.optimizer import SINGD
    except ImportError:
        SINGD = None
    for s in args.structures:
        for jit in (False, True):
            rows.append((f"funcopt singd {s} (T=1{', fo.jit' if jit else ''})", *bench_funcopt(
                fo.singd(model, 1e-3, T=1, structures=(s, s)), model, x, y, args.steps,
                device, jit=jit)))
        if SINGD is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows.append((f"singd package {s} (T=1)", *bench_torch(
                    lambda m, s=s: SINGD(m, lr=1e-3, T=1, structures=(s, s)), model, x, y,
                    args.steps, device)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    head = (f"\n### MLP 784-{args.width}-{args.width}-10, batch {args.batch}, {name}, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}\n\n"
            "| method | step (ms; median, T=10: mean) | optimizer state (MB) |\n"
            "| --- | --- | --- |\n")
    table = head + "".join(f"| {n} | {ms:.2f} | {b / 2**20:.2f} |\n" for n, ms, b in rows)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
