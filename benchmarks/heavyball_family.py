"""funcopt's HeavyBall family next to heavyball 3.2.1: step time, memory, loss on digits.

For each method both libraries have (AdamW, SOAP, PSGD Kron, Muon) and each model (an MLP and
a small CNN on scikit-learn's 8x8 digits), this script measures:

* step time: median over ``--reps`` optimizer steps (gradients fixed; heavyball's ``p.grad`` is
  refilled before each step, outside the timed region; CUDA timings synchronise);
* memory: optimizer-state bytes, and on CUDA the peak allocated memory during the steps above
  the parameters' own;
* loss: training cross-entropy and test accuracy after ``--train-steps`` steps of batch 128,
  both libraries from the same initial weights and the same batches.

heavyball runs eagerly (``heavyball.utils.compile_mode = None``); funcopt runs eagerly too.
Hyperparameters are the same on both sides (heavyball's defaults except the learning rates).

Usage::

    python benchmarks/heavyball_family.py --device cpu --out benchmarks/RESULTS_heavyball.md
    python benchmarks/heavyball_family.py --device cuda --width 1024 --out RESULTS_heavyball_gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
from torch.func import functional_call, grad

import funcopt as fo

LR = {"AdamW": 1e-3, "SOAP": 3e-3, "PSGD": 1e-3, "Muon": 0.02}


def make_model(kind: str, width: int) -> torch.nn.Module:
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(),
                                   torch.nn.Linear(width, width), torch.nn.ReLU(),
                                   torch.nn.Linear(width, 10))
    c = max(width // 16, 8)
    return torch.nn.Sequential(torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(c, 2 * c, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(2 * c * 16, 10))


def digits(device):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    tr, te = perm[:1400], perm[1400:]
    return x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device)


def funcopt_tx(method):
    lr = LR[method]
    if method == "AdamW":
        return fo.adamw(lr, 0.9, 0.99, weight_decay=0.0)
    if method == "SOAP":
        return fo.soap(lr, 0.9, 0.95, weight_decay=0.0)
    if method == "PSGD":
        return fo.psgd_kron(lr)
    return fo.muon(lr)


def heavyball_opt(method, params):
    import heavyball
    heavyball.utils.compile_mode = None
    lr = LR[method]
    if method == "AdamW":
        return heavyball.AdamW(params, lr=lr, betas=(0.9, 0.99))
    if method == "SOAP":
        return heavyball.SOAP(params, lr=lr, weight_decay=0.0)
    if method == "PSGD":
        return heavyball.PSGDKron(params, lr=lr)
    return heavyball.Muon(params, lr=lr)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bytes(tree) -> int:
    return sum(x.numel() * x.element_size() for x in fo.tree_leaves(tree)
               if isinstance(x, torch.Tensor))


def _peak_start(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def _peak(device, base) -> float:
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" \
        else float("nan")


def time_funcopt(method, model, grads, reps, device):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx = funcopt_tx(method)
    state = tx.init(params)
    base = _peak_start(device)
    times = []
    for i in range(reps + 3):
        _sync(device)
        t0 = time.perf_counter()
        u, state = tx.update(grads, state, params)
        params = fo.apply_updates(params, u)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, _bytes(state) / 2**20, _peak(device, base)


def time_heavyball(method, model, grads, reps, device):
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt = heavyball_opt(method, params)
    base = _peak_start(device)
    times = []
    for i in range(reps + 3):
        for p, g in zip(params, grads.values()):
            p.grad = g.clone()
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    state = [v for s in opt.state.values() for v in _state_tensors(s)]
    return statistics.median(times) * 1e3, _bytes(state) / 2**20, _peak(device, base)


def _state_tensors(s):
    if isinstance(s, torch.Tensor):
        yield s
    elif isinstance(s, dict):
        for v in s.values():
            yield from _state_tensors(v)
    elif isinstance(s, (list, tuple)):
        for v in s:
            yield from _state_tensors(v)


def train(method, lib, model_kind, width, data, steps, device):
    xtr, ytr, xte, yte = data
    torch.manual_seed(0)
    model = make_model(model_kind, width).to(device)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, len(ytr), (128,), generator=gen) for _ in range(steps)]

    def loss_fn(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    if lib == "funcopt":
        tx = funcopt_tx(method)
        state = tx.init(params)
        for idx in batches:
            g = grad(loss_fn)(params, xtr[idx], ytr[idx])
            u, state = tx.update(g, state, params)
            params = fo.apply_updates(params, u)
    else:
        leaves = {k: v.requires_grad_(True) for k, v in params.items()}
        opt = heavyball_opt(method, list(leaves.values()))
        for idx in batches:
            loss_fn(leaves, xtr[idx], ytr[idx]).backward()
            opt.step()
        params = {k: v.detach() for k, v in leaves.items()}
    with torch.no_grad():
        final = float(loss_fn(params, xtr, ytr))
        acc = float((functional_call(model, params, (xte,)).argmax(1) == yte).float().mean())
    return final, acc


def _batch_loss(p, model, x, y):
    return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--methods", default="AdamW,SOAP,PSGD,Muon")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="write the report as Markdown to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = digits(device)
    rows = []
    for kind in args.models.split(","):
        torch.manual_seed(0)
        model = make_model(kind, args.width).to(device)
        n = sum(p.numel() for p in model.parameters())
        g = grad(_batch_loss)({k: v.detach() for k, v in model.named_parameters()}, model,
                              data[0][:128], data[1][:128])
        for method in args.methods.split(","):
            for lib, timer in (("funcopt", time_funcopt), ("heavyball", time_heavyball)):
                ms, state_mb, peak_mb = timer(method, model, g, args.reps, device)
                loss, acc = train(method, lib, kind, args.width, data, args.train_steps, device)
                rows.append((kind, n, method, lib, ms, state_mb, peak_mb, loss, acc))
                print(*[f"{v:.4g}" if isinstance(v, float) else v for v in rows[-1]], flush=True)
    report(rows, args, device)
    return 0


NOTES = """Notes
- Same method, different definitions: heavyball 3.2.1's SOAP debiases shampoo_beta and rotates
  the momentum on a basis change (funcopt's SOAP follows 0.7.2's update with the paper's
  shampoo_beta = 0.95); the Muons differ in defaults (heavyball: momentum 0.9, 1-d parameters
  get plain momentum at the Muon lr; funcopt `muon`: momentum 0.95, AdamW at lr 3e-4 for
  non-matrix parameters); AdamW/PSGD are the same math (PSGD matches
  heavyball 3.2.1 to float64 round-off in tests/test_psgd.py). Loss differences in SOAP/Muon
  rows come from these differences, not from noise.
- PSGD state: heavyball stores triangular factors as their packed upper triangle
  (`store_triu_as_line`); funcopt stores full matrices (about 2x the factor memory).
- CPU timings on a shared 2-core machine vary by ~20% between runs."""


def report(rows, args, device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() \
        or platform.machine()
    lines = [
        "# funcopt vs heavyball 3.2.1: step time, memory, loss on digits", "",
        f"- command: `python benchmarks/heavyball_family.py --device {args.device} --width {args.width} "
        f"--reps {args.reps} --train-steps {args.train_steps} --threads {args.threads}`",
        f"- date: {datetime.date.today()}; device: {name} ({device.type}); "
        f"torch {torch.__version__}; threads {torch.get_num_threads()}",
        "- step time: median of the reps, eager on both sides; state: optimizer-state MiB; "
        "peak: CUDA peak allocated during the timed steps above the start (nan on CPU)",
        f"- loss: training cross-entropy (1,400 images) and test accuracy (397) after "
        f"{args.train_steps} steps of batch 128, same init and batches", "",
        "| model | params | method | library | step ms | state MiB | peak MiB | loss | test acc |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, n, method, lib, ms, st, pk, loss, acc in rows:
        lines.append(f"| {kind} | {n:,} | {method} | {lib} | {ms:.3f} | {st:.3f} | {pk:.2f} | "
                     f"{loss:.4f} | {acc:.3f} |")
    text = "\n".join(lines + ["", NOTES]) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    raise SystemExit(main())
