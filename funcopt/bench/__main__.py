"""``python -m funcopt.bench``: run a suite of problems x optimizers and write a report folder."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from funcopt.bench.optimizers import DEFAULT_OPTIMIZERS, OPTIMIZERS
from funcopt.bench.problems import DEFAULT_PROBLEMS, PROBLEMS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m funcopt.bench", description=__doc__)
    p.add_argument("--problems", help="comma-separated problem names (default: the default suite)")
    p.add_argument("--optimizers", help="comma-separated optimizer names (default: all)")
    p.add_argument("--steps", type=int, help="steps per run (default: each problem's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", default="bench-report", help="report folder (replaced when complete)")
    p.add_argument("--plugin", action="append", default=[],
                   help="import this module first (it registers problems/optimizers); repeatable")
    p.add_argument("--list", action="store_true", help="list problems and optimizers and exit")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: small problems run fastest and "
                        "results do not depend on the machine's core count)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _choose(arg: str | None, known: dict, default: list[str], what: str) -> list[str]:
    names = [n.strip() for n in arg.split(",") if n.strip()] if arg else list(default)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(
            f"error: unknown {what} {', '.join(map(repr, unknown))}; "
            f"known {what}s: {', '.join(sorted(known))} (see --list)"
        )
    return names


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {name!r} is not a device name ({e}); use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {name}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise SystemExit(f"error: --device {name}: only cpu and cuda are supported")
    return dev


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for mod in args.plugin:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise SystemExit(f"error: --plugin {mod!r} could not be imported: {e}") from None
    if args.list:
        print("problems:  ", ", ".join(f"{n}{'*' if n in DEFAULT_PROBLEMS else ''}" for n in PROBLEMS))
        print("optimizers:", ", ".join(OPTIMIZERS))
        print("(* = in the default suite)")
        return 0
    if args.steps is not None and args.steps < 1:
        raise SystemExit("error: --steps must be at least 1")
    problems = _choose(args.problems, PROBLEMS, DEFAULT_PROBLEMS, "problem")
    optimizers = _choose(args.optimizers, OPTIMIZERS, DEFAULT_OPTIMIZERS, "optimizer")
    device = _device(args.device)
    if args.threads < 1:
        raise SystemExit("error: --threads must be at least 1")
    torch.set_num_threads(args.threads)

    from funcopt.bench.report import markdown_table, write_report
    from funcopt.bench.run import run_one

    jobs = [(p, o) for p in problems for o in optimizers]
    try:
        from tqdm import tqdm
        bar = tqdm(jobs, disable=args.no_progress, file=sys.stderr, unit="run")
    except ImportError:
        bar = jobs
    results = []
    t0 = time.perf_counter()
    for prob, opt in bar:
        if hasattr(bar, "set_description"):
            bar.set_description(f"{prob} / {opt}")
        results.append(run_one(prob, opt, seed=args.seed, device=device, steps=args.steps))
    meta = {"seed": args.seed, "device": str(device), "steps": args.steps,
            "threads": args.threads, "problems": problems, "optimizers": optimizers, "total_s": time.perf_counter() - t0}
    write_report(results, Path(args.out), meta)
    print(markdown_table(results))
    print(f"\nreport: {args.out}/report.md ({time.perf_counter() - t0:.0f} s)")
    failed = [r for r in results if r.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
