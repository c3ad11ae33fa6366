"""Levenberg-Marquardt at scale: an MLP of 10^5 to 10^6 parameters, time to a target loss.

    python benchmarks/lm_scale.py --device cuda [--params 1e5,3e5,1e6] [--time-limit 60]
    python benchmarks/lm_scale.py --device cpu --params 2e3,1e4 --out benchmarks/RESULTS_lm.md

Problem: ``m`` samples ``x ~ N(0, I_8)`` with targets from a fixed teacher MLP 8-32-1 (tanh),
standardised to mean 0 and variance 1; the student is an MLP 8-w-w-1 (tanh) whose width ``w``
gives the requested number of parameters ``N = w^2 + 11 w + 1`` (rounded). Loss: the mean
squared error over all ``m`` samples (full batch). Target: ``--target`` times the initial loss
(default 1e-3), the same for every contender of a size. Every contender starts from the same
weights, float32.

Contenders, each in its own process (so its peak memory is its own and a crash or a kill
costs only its row):

* ``funcopt LM (memory model)``: ``fo.levenberg_marquardt`` on ``fo.mse_residuals(...,
  per_sample=True)``, stepped as a training loop, on the path ``fo.memory_path`` picks for
  ``--memory-budget`` (default: half of the free device memory, resp. of the available RAM):
  dense with the transform's defaults (Nielsen damping, the column scaling decided by the
  shape: ``D = I`` here, where ``n > m``; ``solver="auto"``),
  or matrix-free with the options ``fo.least_squares`` takes there (CG with the Jacobi
  preconditioner, ``D`` from the same ``diag(J^T J)``, Nielsen);
* ``funcopt LM matrix-free``: the matrix-free path forced (skipped when the memory model
  already picked it);
* ``funcopt LM dense, scaling=False``: the dense path with ``D = I`` (``lambda_0 = 1e-3 max
  diag(J^T J)``), Nielsen's rule: the default where ``n > m``, run under its own name
  (``docs/least_squares.md``, "Step counts on wide networks");
* ``funcopt LM dense, Classic rule``: the dense path with ``rule=fo.Classic()`` (damping
  times 0.1 on an accepted step, times 10 on a rejected one: torch-lm's factors) and the
  column scaling ``D`` (``scaling=True``);
* ``torch-lm``: torch-levenberg-marquardt's ``LevenbergMarquardtModule`` with
  ``solve_method=--peer-solve`` (default ``cholesky``, its fastest) and its other defaults;
  loaded without its package ``__init__`` when that fails (the ``__init__`` imports
  pytorch-lightning for its training utilities, which the module does not use);
* ``Adam``: ``torch.optim.Adam`` (fused), full batch; the learning rate is the one of
  ``--adam-lrs`` with the lowest loss after ``--adam-pilot-steps`` steps (the pilot runs are
  the warm-up and are not timed).

Reported per contender: wall time and steps (one Jacobian, resp. one gradient, each) until
the training loss first reaches the target, steps run, the final loss (recomputed the same way
for all), peak memory (CUDA: ``torch.cuda.max_memory_allocated`` over the timed run, model and
data included; CPU: growth of the process's ``ru_maxrss`` over its set-up, warm-up included),
and ms per step. One warm-up step runs before the clock; the clock stops at the target, at
``--time-limit`` seconds, or at ``--max-steps``; ``torch.cuda.synchronize`` brackets every
step. A contender whose warm-up or run overruns the limit (plus a grace of 25%) is killed and
reported with what it had done.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import platform
import select
import subprocess
import sys
import tempfile
import time
import types

D_IN, TEACHER = 8, 32
CONTENDERS = ("funcopt", "funcopt-mf", "funcopt-noscale", "funcopt-classic", "torch-lm", "adam")
LABEL = {"funcopt": "funcopt LM (memory model)", "funcopt-mf": "funcopt LM matrix-free",
         "funcopt-noscale": "funcopt LM dense, scaling=False",
         "funcopt-classic": "funcopt LM dense, Classic rule",
         "torch-lm": "torch-lm 1.2.3", "adam": "torch Adam"}


def width_for(n: int) -> int:
    """Hidden width ``w`` of the 8-w-w-1 MLP whose ``w^2 + 11 w + 1`` parameters are closest
    to ``n``."""
    w = max(1, round((-11 + math.sqrt(121 + 4 * (n - 1))) / 2))
    return min((w - 1, w, w + 1), key=lambda v: abs(v * v + 11 * v + 1 - n) if v > 0 else n)


def make_problem(n: int, samples: int, device: str, seed: int = 0):
    """``(model, x, y)``: student MLP of about ``n`` parameters, inputs and teacher targets."""
    import torch

    torch.manual_seed(seed)
    x = torch.randn(samples, D_IN)
    teacher = torch.nn.Sequential(torch.nn.Linear(D_IN, TEACHER), torch.nn.Tanh(),
                                  torch.nn.Linear(TEACHER, 1))
    with torch.no_grad():
        y = teacher(2.0 * x)
        y = (y - y.mean()) / y.std()
    w = width_for(n)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, w), torch.nn.Tanh(), torch.nn.Linear(w, w),
                                torch.nn.Tanh(), torch.nn.Linear(w, 1))
    return model.to(device), x.to(device), y.to(device)


def mse(model, params, x, y) -> float:
    import torch
    from torch.func import functional_call

    with torch.no_grad():
        return float(((functional_call(model, params, (x,)) - y) ** 2).mean())


def load_peer():
    """torch_levenberg_marquardt's ``training`` and ``loss`` modules. Its package ``__init__``
    imports ``utils``, which needs pytorch-lightning; when that import fails the two modules
    are loaded under an empty package object instead (they import only torch)."""
    try:
        import torch_levenberg_marquardt as tlm

        return tlm.training, tlm.loss
    except ImportError:
        spec = importlib.util.find_spec("torch_levenberg_marquardt")
        if spec is None or not spec.submodule_search_locations:
            raise
        for name in [k for k in sys.modules if k.startswith("torch_levenberg_marquardt")]:
            del sys.modules[name]
        pkg = types.ModuleType("torch_levenberg_marquardt")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_levenberg_marquardt"] = pkg
        import torch_levenberg_marquardt.loss as loss
        import torch_levenberg_marquardt.training as training

        return training, loss


def peer_installed() -> bool:
    return importlib.util.find_spec("torch_levenberg_marquardt") is not None


# ------------------------------------------------------------------------------ contenders


class FuncoptLM:
    """``fo.levenberg_marquardt`` stepped by hand; ``path`` is ``"dense"`` or
    ``"matrix-free"`` (the options of ``fo.least_squares`` for that path)."""

    lag = 0

    def __init__(self, model, x, y, path: str, budget: int, classic: bool = False,
                 noscale: bool = False):
        from torch.func import functional_call

        import funcopt as fo
        from funcopt.least_squares_options import _matrix_free_options

        fwd = lambda p, xx: functional_call(model, p, (xx,))
        n = sum(v.numel() for v in model.parameters())
        res = fo.mse_residuals(fwd, per_sample=True)
        opts: dict = {}
        if path == "matrix-free":
            solver, rule, opts = _matrix_free_options(x.shape[0], n, x.dtype, budget,
                                                      fo.Nielsen(), {})
            opts = {**opts, "rule": rule, "solver": solver}
        elif classic:
            opts = {"rule": fo.Classic(), "scaling": True}  # torch-lm's factors, with D
        elif noscale:
            opts = {"scaling": False}  # D = I, as torch-lm
        self.make = lambda: fo.levenberg_marquardt(res, **opts)
        self.fo, self.batch = fo, (x, y)
        self.params = {k: v.detach().clone() for k, v in model.named_parameters()}
        self.setting = ("dense, Classic (x0.1 / x10), scaling, solver auto" if classic else
                        "dense, Nielsen, D=I (scaling=False), solver auto" if noscale else
                        f"dense, Nielsen, default scaling ({'D' if x.shape[0] >= n else 'D=I'}"
                        "), solver auto" if path == "dense" else
                        f"CG jacobi tol {opts['solver'].tol:.1e}, Nielsen, "
                        f"{'D from diag(J^T J)' if opts['scaling'] else 'D=I'}, "
                        f"chunk {opts['chunk_size']}")

    def warm_up(self):
        tx = self.make()
        p = {k: v.clone() for k, v in self.params.items()}
        tx.update(None, tx.init(p), p, batch=self.batch)
        self.tx = self.make()
        self.state = self.tx.init(self.params)

    def step(self) -> float:
        upd, self.state = self.tx.update(None, self.state, self.params, batch=self.batch)
        self.params = self.fo.apply_updates(self.params, upd)
        return 2.0 * float(self.state.new_cost)  # 0.5 ||r||^2 = 0.5 MSE


class PeerLM:
    """torch-levenberg-marquardt's ``LevenbergMarquardtModule.training_step``."""

    lag = 0

    def __init__(self, model, x, y, solve_method: str):
        import logging

        logging.getLogger("torch_levenberg_marquardt").setLevel(logging.ERROR)
        self.training, self.loss = load_peer()
        self.model, self.x, self.y, self.solve = model, x, y, solve_method
        self.setting = f"solve_method={solve_method}, standard damping"
        self.stopped = False

    def _module(self):
        net = copy.deepcopy(self.model)
        return net, self.training.LevenbergMarquardtModule(
            net, loss_fn=self.loss.MSELoss(), solve_method=self.solve)

    def warm_up(self):
        _, lm = self._module()
        lm.training_step(self.x, self.y)
        del lm
        self.net, self.lm = self._module()

    def step(self) -> float:
        _, loss, stop, _ = self.lm.training_step(self.x, self.y)
        self.stopped = bool(stop)
        return float(loss)

    @property
    def params(self):
        return {k: v.detach() for k, v in self.net.named_parameters()}


class Adam:
    """``torch.optim.Adam`` (fused), full batch; ``step`` returns the loss before its update,
    i.e. of the parameters after the previous step (``lag = 1``)."""

    lag = 1

    def __init__(self, model, x, y, lrs, pilot_steps: int):
        self.model, self.x, self.y, self.lrs, self.pilot = model, x, y, lrs, pilot_steps

    def _start(self, lr):
        import torch

        self.net = copy.deepcopy(self.model)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, fused=True)

    def warm_up(self):
        best = (math.inf, self.lrs[0])
        for lr in self.lrs:
            self._start(lr)
            for _ in range(self.pilot):
                self.step()
            loss = mse(self.net, self.params, self.x, self.y)
            best = min(best, (loss if math.isfinite(loss) else math.inf, lr))
        self.lr = best[1]
        self.setting = f"lr {self.lr:g} (best of {','.join(f'{v:g}' for v in self.lrs)} " \
                       f"after {self.pilot} steps), fused"
        self._start(self.lr)

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = ((self.net(self.x) - self.y) ** 2).mean()
        loss.backward()
        self.opt.step()
        return float(loss)

    @property
    def params(self):
        return {k: v.detach() for k, v in self.net.named_parameters()}


# ------------------------------------------------------------------------------ worker


def emit(**kw):
    print(json.dumps(kw), flush=True)


def _memory_budget(spec, device: str) -> int:
    import torch

    if spec["budget"] is not None:
        return int(spec["budget"])
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] // 2
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    return avail * 1024 // 2


def _peak(device: str, rss0: int) -> int:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024


def _build(spec, model, x, y, budget):
    import funcopt as fo

    kind = spec["contender"]
    if kind in ("funcopt", "funcopt-mf"):
        n = sum(p.numel() for p in model.parameters())
        path = "matrix-free" if kind == "funcopt-mf" else \
            fo.memory_path(x.shape[0], n, x.element_size(), budget)
        return FuncoptLM(model, x, y, path, budget), path
    if kind == "funcopt-classic":
        return FuncoptLM(model, x, y, "dense", budget, classic=True), "dense"
    if kind == "funcopt-noscale":
        return FuncoptLM(model, x, y, "dense", budget, noscale=True), "dense"
    if kind == "torch-lm":
        return PeerLM(model, x, y, spec["peer_solve"]), "dense"
    return Adam(model, x, y, spec["adam_lrs"], spec["adam_pilot_steps"]), "-"


def _train(runner, spec, sync, peak, target):
    """The timed loop: stops at the target, the time limit or the step limit."""
    times, reached, loss, steps, last = [0.0], None, math.nan, 0, 0.0
    t0 = time.perf_counter()
    while steps < spec["max_steps"]:
        sync()
        loss = runner.step()
        sync()
        steps += 1
        times.append(time.perf_counter() - t0)
        at = steps - runner.lag
        if reached is None and at >= 1 and loss <= target:
            reached = (times[at], at)
        if times[-1] - last >= 0.5:
            last = times[-1]
            emit(progress=True, steps=steps, t=times[-1], loss=loss, peak=peak(), reached=reached)
        if reached or times[-1] >= spec["time_limit"] or getattr(runner, "stopped", False) \
                or not math.isfinite(loss):
            break
    return times[-1], steps, reached


def worker(spec) -> None:
    import resource

    import torch

    device = spec["device"]
    torch.set_num_threads(spec["threads"])
    if device == "cpu" and spec["cpu_mem_gb"]:
        lim = int(spec["cpu_mem_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, x, y = make_problem(spec["n"], spec["samples"], device)
    p0 = {k: v.detach() for k, v in model.named_parameters()}
    loss0 = mse(model, p0, x, y)
    target = spec["target"] * loss0
    budget = _memory_budget(spec, device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        runner, path = _build(spec, model, x, y, budget)
        emit(ready=True, n=sum(v.numel() for v in p0.values()), width=width_for(spec["n"]),
             loss0=loss0, target=target, budget=budget, path=path,
             device=torch.cuda.get_device_name() if device == "cuda" else platform.machine())
        t = time.perf_counter()
        runner.warm_up()
        sync()
        emit(warm=time.perf_counter() - t, setting=runner.setting)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        peak = lambda: _peak(device, rss0)
        elapsed, steps, reached = _train(runner, spec, sync, peak, target)
        emit(done=True, steps=steps, t=elapsed, reached=reached, peak=peak(),
             final=mse(model, runner.params, x, y),
             stopped=getattr(runner, "stopped", False))
    except Exception as e:  # one row reports it; the other contenders still run
        text = f"{type(e).__name__}: {e}"
        oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or \
            "out of memory" in text or "can't allocate memory" in text
        emit(error="out of memory" if oom else text.splitlines()[0][:160])


# ------------------------------------------------------------------------------ parent


def run_contender(spec, grace: float) -> dict:
    """Run one contender in a child process; returns the merged JSON lines it printed, with
    ``killed`` set when it overran (``setup``: 300 s; warm-up and run: the time limit each,
    plus ``grace``)."""
    limit = spec["time_limit"]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=err, text=True)
        info: dict = {}
        phase, deadline = "set-up", time.monotonic() + 300
        while True:
            left = deadline - time.monotonic()
            ready = select.select([proc.stdout], [], [], max(0.0, left))[0]
            if not ready:
                proc.kill()
                proc.wait()
                info["killed"] = phase
                break
            line = proc.stdout.readline()
            if not line:
                proc.wait()
                break
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            info.update(msg)
            if "ready" in msg:
                phase, deadline = "warm-up", time.monotonic() + limit + grace
            elif "warm" in msg:
                phase, deadline = "run", time.monotonic() + limit + grace
        if proc.returncode not in (0, None) and "error" not in info and "killed" not in info:
            err.seek(0)
            tail = [s for s in err.read().splitlines() if s.strip()]
            info["error"] = (tail[-1] if tail else f"exit code {proc.returncode}")[:160]
    return info


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def row(n_req: int, kind: str, info: dict) -> str:
    size = f"{info.get('n', '?')} (w={info.get('width', '?')})"
    name = LABEL[kind]
    setting = info.get("setting", info.get("path", "-"))
    if kind == "funcopt":
        setting = f"path {info.get('path', '?')}: {setting}"
    if "error" in info or ("killed" in info and "steps" not in info):
        why = info.get("error") or f"killed: {info['killed']} over the time limit"
        return f"| {size} | {name} | {setting} | {why} | - | - | - | - | - |"
    steps = info.get("steps", 0)
    t = info.get("t", math.nan)
    reached = info.get("reached")
    ttt = f"{reached[0]:.2f} s" if reached else f"not reached in {t:.1f} s"
    sts = str(reached[1]) if reached else "-"
    final = info.get("final")
    final_s = f"{final:.3g}" if final is not None else f"{info.get('loss', math.nan):.3g} (last seen)"
    note = " (killed mid-step)" if "killed" in info else ""
    if info.get("stopped"):
        note += " (its damping hit its cap: stop_training)"
    ms = 1e3 * t / steps if steps else math.nan
    return (f"| {size} | {name} | {setting} | {ttt}{note} | {sts} | {steps} | {final_s} | "
            f"{fmt_bytes(info.get('peak'))} | {ms:.1f} |")


HEADER = ("| params (width) | contender | setting | time to target | steps to target | steps "
          "| final loss (MSE) | peak memory | ms/step |\n" + "|" + " --- |" * 9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--params", help="comma-separated parameter counts (default 1e5,3e5,1e6 on "
                    "cuda, 2e3,1e4 on cpu)")
    ap.add_argument("--samples", type=int, help="m (default 4096 on cuda, 512 on cpu)")
    ap.add_argument("--target", type=float, default=1e-3, help="target loss / initial loss")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per contender")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--memory-budget", type=float, help="bytes for fo.memory_path (default: "
                    "half the free device memory, resp. half the available RAM)")
    ap.add_argument("--peer-solve", default="cholesky", choices=["cholesky", "qr", "solve"])
    ap.add_argument("--adam-lrs", default="1e-3,3e-3,1e-2")
    ap.add_argument("--adam-pilot-steps", type=int, default=200)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per contender")
    ap.add_argument("--cpu-mem-gb", type=float, default=8.0,
                    help="address-space limit of a CPU contender's process (0: none)")
    ap.add_argument("--out", help="append the header and table to this markdown file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    import torch

    cuda = args.device == "cuda"
    sizes = [int(float(v)) for v in (args.params or ("1e5,3e5,1e6" if cuda else "2e3,1e4")).split(",")]
    samples = args.samples or (4096 if cuda else 512)
    kinds = [k for k in args.contenders.split(",") if k]
    bad = [k for k in kinds if k not in CONTENDERS]
    if bad:
        ap.error(f"--contenders: unknown {bad}; choose from {','.join(CONTENDERS)}")
    grace = max(5.0, 0.25 * args.time_limit)
    dev = "name below" if cuda else platform.machine()
    lines = [f"`python benchmarks/lm_scale.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             "", f"{time.strftime('%Y-%m-%d')}, device {args.device} ({dev}), torch "
             f"{torch.__version__}, {args.threads} thread(s), float32, m = {samples} samples, "
             f"target = {args.target:g} x initial MSE, time limit {args.time_limit:g} s per "
             f"contender, torch-levenberg-marquardt "
             f"{'installed' if peer_installed() else 'not installed'}", "", HEADER]
    print("\n".join(lines), flush=True)
    notes: list[str] = []
    for n in sizes:
        auto_path = None
        for kind in kinds:
            if kind == "torch-lm" and not peer_installed():
                r = (f"| {n} (w={width_for(n)}) | {LABEL[kind]} | solve_method={args.peer_solve} "
                     "| not installed | - | - | - | - | - |")
            elif kind == "funcopt-mf" and auto_path == "matrix-free":
                r = (f"| {n} (w={width_for(n)}) | {LABEL[kind]} | - | same as the memory "
                     "model's row | - | - | - | - | - |")
            else:
                spec = dict(contender=kind, n=n, samples=samples, device=args.device,
                            target=args.target, time_limit=args.time_limit,
                            max_steps=args.max_steps, budget=args.memory_budget,
                            peer_solve=args.peer_solve, threads=args.threads,
                            adam_lrs=[float(v) for v in args.adam_lrs.split(",")],
                            adam_pilot_steps=args.adam_pilot_steps, cpu_mem_gb=args.cpu_mem_gb)
                info = run_contender(spec, grace)
                if kind == "funcopt":
                    auto_path = info.get("path")
                r = row(n, kind, info)
                if "budget" in info and kind == "funcopt":
                    notes.append(f"N = {info['n']}: m n + m^2 = {samples * info['n'] + samples**2:.3g} "
                                 f"numbers against a memory budget of {fmt_bytes(info['budget'])}"
                                 f" -> {info['path']}; initial MSE {info['loss0']:.4g}, target "
                                 f"{info['target']:.4g}" + (f"; {info['device']}" if cuda else ""))
            lines.append(r)
            print(r, flush=True)
    lines += [""] + [f"- {v}" for v in notes]
    print("\n".join(lines[-len(notes) - 1:]), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
