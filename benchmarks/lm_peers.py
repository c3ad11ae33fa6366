"""funcopt's Levenberg-Marquardt against torch-levenberg-marquardt on two small networks.

    python benchmarks/lm_peers.py [--device cuda] [--steps 50] [--threads 1]

Needs ``torch-levenberg-marquardt`` (1.2.3; loaded as in ``lm_scale.py``, so pytorch-lightning is optional) and scikit-learn
besides funcopt. Problems:

* ``sin``: a 1-32-32-1 tanh MLP fitting ``sin(2x)`` on 512 points of ``[-pi, pi]`` (MSE);
* ``digits``: a 64-32-10 tanh MLP on scikit-learn's digits (80/20 split, full training batch of
  1437, cross-entropy through square-root residuals).

Both packages start from the same weights and data (float32) and take the same number of steps
(one Jacobian each; rejected attempts inside a step are part of it). Reported: median ms per step
after a warm-up, final training loss (MSE, resp. mean cross-entropy, computed the same way for
both), test accuracy for digits, and the final damping. The peer runs with its default
(``solve_method="qr"``) and with ``"cholesky"``; funcopt with its defaults (``solver="auto"``:
Cholesky with a least-squares fallback; the column scaling by shape: ``D`` on digits, where the
residuals outnumber the parameters, ``D = I`` on sin) and with ``"cholesky"`` and each scaling
set explicitly (``scaling=True``; ``scaling=False``, ``D = I`` as the peer); each funcopt setting is run with the generic Jacobian
(reverse mode over the whole batch, one backward pass per residual) and, as "funcopt
per-sample", with the residual adapters' ``per_sample=True`` (``vmap`` over samples of the
Jacobian of one sample's residuals, as the peer does). The peer's warnings for failed Cholesky
factorisations are silenced; such attempts show up as solves and steps with no move.
"funcopt graphed" is "funcopt per-sample" with ``cuda_graph=True``: each update replayed from
two CUDA graphs (the linearization, one attempt; captured on the first update, which the
warm-up steps hold), with one host read per attempt; on a CPU the same pieces run eagerly.
``--packages "funcopt per-sample"`` runs only the rows of one package label.
"""

import argparse
import copy
import logging
import math
import statistics
import time

import torch
from torch.func import functional_call

import funcopt as fo


def make_problem(name, device):
    """(model, train inputs, train targets, test inputs, test targets) in float32 on device."""
    torch.manual_seed(0)
    if name == "sin":
        x = torch.linspace(-math.pi, math.pi, 512).unsqueeze(1)
        y = torch.sin(2 * x)
        model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                                    torch.nn.Tanh(), torch.nn.Linear(32, 1))
        data = (x, y, None, None)
    else:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        X, y = load_digits(return_X_y=True)
        Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.2, random_state=0)
        f = lambda a: torch.tensor(a, dtype=torch.float32)
        data = (f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte))
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    model = model.to(device)
    return (model, *(None if d is None else d.to(device) for d in data))


def metrics(name, model, params, xtr, ytr, xte, yte):
    """Final training loss (MSE or mean cross-entropy) and test accuracy (digits only)."""
    with torch.no_grad():
        out = functional_call(model, params, (xtr,))
        if name == "sin":
            return ((out - ytr) ** 2).mean().item(), float("nan")
        loss = torch.nn.functional.cross_entropy(out, ytr).item()
        acc = (functional_call(model, params, (xte,)).argmax(1) == yte).float().mean().item()
        return loss, acc


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_funcopt(name, model, xtr, ytr, steps, solver, device, per_sample=False, **kw):
    """funcopt.levenberg_marquardt: step times, final params and damping, no-move steps, solves."""
    forward = lambda p, x: functional_call(model, p, (x,))
    adapter = fo.mse_residuals if name == "sin" else fo.cross_entropy_residuals
    res = adapter(forward, per_sample=per_sample)
    tx = fo.levenberg_marquardt(res, solver=solver, **kw)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state, times, rejected, solves = tx.init(params), [], 0, 0
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        upd, state = tx.update(None, state, params, batch=(xtr, ytr))
        params = fo.apply_updates(params, upd)
        sync(device)
        times.append(time.perf_counter() - t)
        rejected += not bool(state.accepted)
        solves += int(state.attempts)
    return times, params, state.damping.item(), rejected, solves


def run_peer(name, model, xtr, ytr, steps, solve_method, device):
    """torch_levenberg_marquardt.training.LevenbergMarquardtModule.training_step."""
    from lm_scale import load_peer  # the same loader: works without pytorch-lightning

    training, tlm_loss = load_peer()
    logging.getLogger("torch_levenberg_marquardt").setLevel(logging.ERROR)
    net = copy.deepcopy(model)
    loss = tlm_loss.MSELoss() if name == "sin" else tlm_loss.CrossEntropyLoss()
    lm = training.LevenbergMarquardtModule(net, loss_fn=loss, solve_method=solve_method)
    times, rejected, solves, logs = [], 0, 0, {}
    for _ in range(steps):
        before = lm.flat_params.clone()
        sync(device)
        t = time.perf_counter()
        _, _, _, logs = lm.training_step(xtr, ytr)
        sync(device)
        times.append(time.perf_counter() - t)
        rejected += bool(torch.equal(before, lm.flat_params))
        solves += int(logs["attempts"])
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    return times, params, float(logs.get("damping", float("nan"))), rejected, solves


PEER = "torch-lm 1.2.3"
NIELSEN = "Nielsen, lambda_0=1e-3, D=diag(running max col norm^2)"
NIELSEN_I = "Nielsen, scaling=False: D=I, lambda_0=1e-3 max diag(J^T J)"
DEFAULT = "Nielsen, default scaling: D where m >= n (digits), D=I where n > m (sin)"
PER_SAMPLE = "funcopt per-sample"
GRAPHED = "funcopt graphed"  # per-sample, cuda_graph=True (on a CPU the same pieces, eagerly)
CONFIGS = [
    ("funcopt", "auto", DEFAULT, {}),
    ("funcopt", "cholesky", NIELSEN, {"scaling": True}),
    ("funcopt", "cholesky", NIELSEN_I, {"scaling": False}),
    (PER_SAMPLE, "auto", DEFAULT, {"per_sample": True}),
    (PER_SAMPLE, "cholesky", NIELSEN, {"scaling": True, "per_sample": True}),
    (PER_SAMPLE, "cholesky", NIELSEN_I, {"scaling": False, "per_sample": True}),
    (GRAPHED, "auto", DEFAULT, {"per_sample": True, "cuda_graph": True}),
    (GRAPHED, "auto", NIELSEN_I, {"scaling": False, "per_sample": True, "cuda_graph": True}),
    (PEER, "qr", "standard (default): lambda_0=1e-3, x0.1 / x10, D=I, J^T J / N", {}),
    (PEER, "cholesky", "standard (default): lambda_0=1e-3, x0.1 / x10, D=I, J^T J / N", {}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--problems", default="sin,digits")
    ap.add_argument("--packages", default="all",
                    help="comma-separated package labels to run (e.g. 'funcopt per-sample'), "
                         "or 'all'")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps, median over steps {args.warmup + 1}-{args.steps}\n")
    print("| problem | package | solver | damping rule | ms/step (median) | final train loss | "
          "test acc | final damping | steps with no move | solves |")
    print("|" + " --- |" * 10)
    for name in args.problems.split(","):
        model, xtr, ytr, xte, yte = make_problem(name, args.device)
        for pkg, solver, rule, kw in CONFIGS:
            if args.packages != "all" and pkg not in args.packages.split(","):
                continue
            run = run_funcopt if pkg.startswith("funcopt") else run_peer
            times, params, damping, rejected, solves = run(name, model, xtr, ytr, args.steps,
                                                           solver, args.device, **kw)
            loss, acc = metrics(name, model, params, xtr, ytr, xte, yte)
            ms = 1e3 * statistics.median(times[args.warmup:])
            acc_s = "-" if math.isnan(acc) else f"{acc:.3f}"
            print(f"| {name} | {pkg} | {solver} | {rule} | {ms:.2f} | {loss:.4g} | {acc_s} | "
                  f"{damping:.3g} | {rejected} | {solves} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
