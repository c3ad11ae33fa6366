"""The optimizer step table in one command, on the current device.

    python benchmarks/step_table.py --device cuda --big --write benchmarks/RESULTS_steps.md

Prints one markdown section (``--write FILE`` also writes it, replacing FILE): a header (device,
torch, date, copy bandwidth, the command), then the tables picked by ``--sections``:

1. ``adamw``: AdamW, SGD-momentum, Lion; step_speed.py's torch-foreach, torch-fused,
   funcopt-eager, funcopt-adapter, funcopt-jit (and funcopt-ravel-graph on CUDA) on its cases
   gpt184, b (a, 1e9 parameters, ~45 GB, with ``--big``) on CUDA, mlp and a (2e7) on a CPU. Cell:
   ms per step, its multiple of the floor ``N * bytes_per_param / B`` (B the copy bandwidth
   measured first; on a CPU a reference, not a bound: mlp fits in cache), peak MB (CUDA only);
   then funcopt's time over torch-fused's, per case.
2. ``heavyball``: Muon, SOAP, PSGD Kron on gpt184 (CUDA) or mlp (CPU): funcopt's eager step
   against heavyball compiled (mode ``--heavyball-compile``; CUDA only) and eager.
3. ``singd``: full training steps (forward, backward, update) of the MLP 784-W-W-10, batch W
   (1024 on CUDA, 256 on a CPU; natural_gradient.py): funcopt's SINGD dense and diagonal
   against the singd package (T=1), funcopt's KFAC (T=1, T=10), all eager; optimizer-state MB.

Timing: ``step_speed.measure_one_by_one`` (set-up and first call, which compiles, untimed; 3
warm-up steps; the median of ``--repeat`` steps, the mean for Muon/SOAP/PSGD; CUDA events on a
GPU, the host clock on a CPU) and ``natural_gradient.bench_torch`` / ``bench_funcopt`` (median
of ``--repeat`` synchronised steps after 3 warm-up; T=10 the mean of a block). A contender that
fails (out of memory, not installed, compile error) gets a cell "failed: <reason>" and the run
goes on. ``--quick``: one case, AdamW, Muon, SINGD dense at width 64, nothing compiled (a test
of the table, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import natural_gradient as ng  # noqa: E402
import step_speed as ss  # noqa: E402

import funcopt as fo  # noqa: E402

SECTIONS = ("adamw", "heavyball", "singd")
TITLES = {"adamw": "AdamW", "sgd": "SGD (momentum 0.9)", "lion": "Lion",
          "muon": "Muon (bf16 Newton-Schulz)", "soap": "SOAP", "psgd": "PSGD Kron"}
STEP_ROWS = ["torch-foreach", "torch-fused", "funcopt-eager", "funcopt-adapter", "funcopt-jit",
             "funcopt-ravel-graph"]


def failed(e: BaseException | str) -> str:
    """The cell of a failed contender: its reason on one line, with no ``|``."""
    reason = e if isinstance(e, str) else f"{type(e).__name__}: {str(e)[:80]}"
    return "failed: " + " ".join(reason.replace("|", "/").split())


def measure(method: str, names: list[str], case: str, dev: str, repeat: int) -> dict:
    """``{contender: (seconds, peak MB or None) or "failed: ..."}`` for ``method`` on ``case``
    by ``step_speed.measure_one_by_one``; a contender whose set-up declines (its package is not
    installed, or it is not for this device) fails as "not available"."""
    print(f"step_table: {method} on {case}", file=sys.stderr, flush=True)
    torch._dynamo.reset()  # torch.compile's recompile limit is per code object: start afresh
    out: dict = {n: failed("not available (not installed, or not for this device)") for n in names}
    shapes = ss.shapes_for(case, dev)
    for name, t, peak, _faults, err in ss.measure_one_by_one(
            ss.contenders(method, names), shapes, dev, repeat, method):
        out[name] = failed(err) if err is not None else (t, peak)
    return out


def cell(r, floor: float | None = None) -> str:
    """"ms, x floor, peak MB" (the floor part only when ``floor`` is given; peak "-" off CUDA)."""
    if isinstance(r, str):
        return r
    t, peak = r
    parts = [f"{t * 1e3:.3f} ms"] + ([f"{num(t / floor)}x"] if floor is not None else [])
    return ", ".join(parts + ["-" if peak is None else f"{peak:.0f} MB"])


def num(x: float) -> str:  # two decimals; two significant digits below 0.1 (never "0.00")
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def ratio(a, b) -> str:
    return num(a[0] / b[0]) if isinstance(a, tuple) and isinstance(b, tuple) else "-"


def table(head: list[str], rows: list[list[str]]) -> list[str]:  # a markdown table
    return ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows)]


def numel(case: str, dev: str) -> tuple[int, int]:  # (parameters, tensors) of a case
    shapes = ss.shapes_for(case, dev)
    return sum(torch.Size(s).numel() for s in shapes), len(shapes)


def method_table(method: str, names: list[str], cases: list[str], dev: str, bw: float,
                 repeat: int) -> list[str]:
    """One element-wise method's table: a row per contender, a column per case, then each
    funcopt row's time over torch-fused's (none for Lion: torch.optim has no Lion)."""
    lion = method == "lion"
    which = [n for n in names if not (lion and n.startswith("torch"))]
    res, head = {}, [f"{TITLES[method]} ({ss.BYTES[method]} B/param{'; torch.optim has none' * lion})"]
    for case in cases:
        n, k = numel(case, dev)
        floor = ss.floor_seconds(n, method, bw)
        res[case] = (floor, measure(method, which, case, dev, repeat))
        head.append(f"{case}: {n:,} params / {k} tensors, floor {floor * 1e3:.3f} ms")
    head += [] if lion else [f"time / torch-fused ({', '.join(cases)})"]
    rows = []
    for name in which:
        row = [name] + [cell(r[name], floor) for floor, r in res.values()]
        if not lion:
            row.append(", ".join(ratio(r[name], r["torch-fused"]) for _, r in res.values())
                       if name.startswith("funcopt") else "-")
        rows.append(row)
    return table(head, rows)


def adamw_section(args, dev: str, bw: float) -> list[str]:
    """Table 1: element-wise steps against torch.optim and the floor."""
    gpu = dev == "cuda"
    if gpu:
        cases = ["gpt184"] if args.quick else ["gpt184", "b"] + (["a"] if args.big else [])
    else:
        cases = ["mlp"] if args.quick else ["mlp", "a"]
    names = STEP_ROWS[:4] if args.quick else STEP_ROWS if gpu else STEP_ROWS[:5]
    out = ["", "### Element-wise steps against torch.optim and the floor", "",
           "Cell: ms per step (median), multiple of the floor, peak MB allocated (CUDA only). "
           "Last column: the funcopt row's time / torch-fused's, per case."
           + ("" if args.big or not gpu else " Case a (1e9 parameters) needs `--big`.")]
    for method in ["adamw"] if args.quick else ["adamw", "sgd", "lion"]:
        out += method_table(method, names, cases, dev, bw, args.repeat)
    return out


def heavyball_section(args, dev: str) -> list[str]:
    """Table 2: funcopt's eager SOAP / PSGD Kron / Muon against heavyball."""
    out = ["", "### Muon, SOAP, PSGD Kron against heavyball", ""]
    try:
        import heavyball  # noqa: F401
    except ImportError:
        return out + ["_heavyball is not installed (`pip install heavyball`): skipped._"]
    ss.HEAVYBALL_COMPILE = args.heavyball_compile
    case = "gpt184" if dev == "cuda" else "mlp"
    n, k = numel(case, dev)
    hb = (["heavyball"] if dev == "cuda" and not args.quick else []) + ["heavyball-eager"]
    version = importlib.metadata.version("heavyball")
    label = {"heavyball": f"heavyball {version} compiled ({args.heavyball_compile})",
             "heavyball-eager": f"heavyball {version} eager", "funcopt-eager": "funcopt eager"}
    out.append(f"Case {case} ({n:,} params / {k} tensors). Cell: mean ms per step, peak MB "
               "allocated (CUDA only)." + ("" if hb[0] == "heavyball" else
                                                     " heavyball compiled: CUDA only."))
    head = ["method"] + [label[h] for h in [*hb, "funcopt-eager"]]
    head += [f"funcopt / {label[h]}" for h in hb]
    rows = []
    for method in ["muon"] if args.quick else ["muon", "soap", "psgd"]:
        r = measure(method, [*hb, "funcopt-eager"], case, dev, args.repeat)
        rows.append([TITLES[method]] + [cell(r[h]) for h in [*hb, "funcopt-eager"]]
                    + [ratio(r["funcopt-eager"], r[h]) for h in hb])
    return out + table(head, rows)


def timed_step(bench, *a, **kw):  # (ms, state MB) of a natural_gradient bench, or "failed: ..."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ms, nbytes = bench(*a, **kw)
        return ms, nbytes / 2**20
    except Exception as e:  # report, keep going
        return failed(e)


def singd_section(args, dev: str) -> list[str]:
    """Table 3: funcopt's SINGD and KFAC against the singd package, full training steps."""
    out = ["", "### SINGD and KFAC against the singd package", ""]
    try:
        from singd.optim.optimizer import SINGD
    except ImportError:
        return out + ["_singd is not installed (`pip install singd`): skipped._"]
    width = 64 if args.quick else 1024 if dev == "cuda" else 256
    device = torch.device(dev)
    model = ng.model_for(width, device)
    x = torch.randn(width, 784, device=device)
    y = torch.randint(0, 10, (width,), device=device)
    out.append(f"MLP 784-{width}-{width}-10, batch {width}, singd "
               f"{importlib.metadata.version('singd')}, eager. Step: forward, backward, update; "
               "median ms (T=10: mean). Last column: time / the singd package's (KFAC: dense).")
    print("step_table: singd and kfac", file=sys.stderr, flush=True)
    res = {}
    for s in ["dense"] if args.quick else ["dense", "diagonal"]:
        res[f"singd package {s} (T=1)"] = timed_step(
            ng.bench_torch, lambda m, s=s: SINGD(m, lr=1e-3, T=1, structures=(s, s)),
            model, x, y, args.repeat, device)
        res[f"funcopt singd {s} (T=1)"] = timed_step(
            ng.bench_funcopt, fo.singd(model, 1e-3, T=1, structures=(s, s)),
            model, x, y, args.repeat, device)
    for T in (1, 10):
        res[f"funcopt kfac (T={T})"] = timed_step(
            ng.bench_funcopt, fo.kfac(model, 1e-3, momentum=0.9, T=T),
            model, x, y, args.repeat, device, T=T)
    rows = []
    for name, r in res.items():
        ref = "dense" if "kfac" in name else name.split()[2]
        vs = ratio(r, res[f"singd package {ref} (T=1)"]) if name.startswith("funcopt") else "-"
        rows.append([name] + ([r, ""] if isinstance(r, str) else [f"{r[0]:.3f}", f"{r[1]:.2f}"])
                    + [vs])
    return out + table(["method", "step ms", "state MB", "time / singd package"], rows)


def device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.machine() + " CPU"
    return f"{name}, torch threads {torch.get_num_threads()}"


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeat", type=int, help="timed steps (default 20 on CUDA, 10 on a CPU)")
    ap.add_argument("--big", action="store_true", help="add case a (1e9 parameters) on CUDA")
    ap.add_argument("--write", metavar="FILE", help="also write the section to FILE (replaced)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--heavyball-compile", default="default",
                    help="torch.compile mode of the compiled heavyball rows (default: default)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: see the module docstring")
    args = ap.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad or not args.sections:
        ap.error(f"--sections: unknown or empty {bad}; choose from {','.join(SECTIONS)}")
    if args.repeat is None:
        args.repeat = 20 if args.device == "cuda" else 10
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; use --device cpu")
    return args


def build(args: argparse.Namespace, argv: list[str]) -> str:
    """The markdown section for ``args`` (``argv`` is quoted as the command)."""
    bw = ss.copy_bandwidth(args.device)
    lines = [f"## Optimizer steps: {device_name(args.device)}, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}, copy bandwidth {bw / 1e9:.1f} GB/s", "",
             "`" + shlex.join(["python", "benchmarks/step_table.py", *argv]) + "`"]
    if "adamw" in args.sections:
        lines += adamw_section(args, args.device, bw)
    if "heavyball" in args.sections:
        lines += heavyball_section(args, args.device)
    if "singd" in args.sections:
        lines += singd_section(args, args.device)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = build(args, argv)
    print(text, end="", flush=True)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
