"""Where an optimizer step's peak GPU memory goes: funcopt against heavyball 3.2.1, eager.

For each contender the script builds the step of ``step_speed.py`` (same shapes, settings and
fixed random gradients), runs ``--warmup`` steps, then records one step with the CUDA caching
allocator's history (``torch.cuda.memory._record_memory_history``). It replays that step's
allocations and frees, finds the moment of the largest live total and prints, above the
memory held before the step (parameters, gradients, optimizer state):

- the peak (what ``torch.cuda.max_memory_allocated`` would show for this step), and
- the blocks live at that moment that the step itself allocated, grouped by the innermost
  frame of the optimizer's own source (file:line function), largest first.

Usage::

    python benchmarks/peak_memory.py --cases gpt184 --methods psgd
    python benchmarks/peak_memory.py --cases gpt184 --methods psgd,soap,muon,adamw --top 8
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import step_speed  # noqa: E402

OWN = ("funcopt", "heavyball")  # frames from these packages name a block's origin


def _origin(frames) -> str:
    for f in frames:  # innermost first
        name = f["filename"]
        if any(f"/{pkg}/" in name for pkg in OWN) and "/bench" not in name:
            short = name[name.rfind("/", 0, name.rfind("/")) + 1:]
            return f"{short}:{f['line']} {f['name']}"
    return "(outside the optimizer)"


def step_peak(step, warmup: int) -> tuple[float, list[tuple[str, float]]]:
    """(peak MB above the start of one step, [(origin, MB live at the peak)])."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python")
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    cur = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in snap["device_traces"][torch.cuda.current_device()]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], _origin(ev.get("frames", [])))
            cur += ev["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])[0]
    by = collections.Counter()
    for size, origin in at_peak.values():
        by[origin] += size
    return peak / 2**20, [(o, b / 2**20) for o, b in by.most_common()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="gpt184")
    ap.add_argument("--methods", default="psgd")
    ap.add_argument("--contenders", default="funcopt-eager,heavyball-eager")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("peak_memory.py reads the CUDA allocator's history: run it on a GPU")
    dev = "cuda"
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for case in args.cases.split(","):
        shapes = step_speed.shapes_for(case, dev)
        n = sum(torch.Size(s).numel() for s in shapes)
        for method in args.methods.split(","):
            table = step_speed.contenders(method, args.contenders.split(","))
            for name, setup in table.items():
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                step = setup(shapes, dev)
                if step is None:
                    continue
                peak, rows = step_peak(step, args.warmup)
                held = (torch.cuda.memory_allocated() - base) / 2**20
                print(f"\n## {case} ({n:,} params, {n * 4 / 2**20:.0f} MB in fp32), {method}, {name}: "
                      f"held between steps {held:.0f} MB, step peak above that {peak:.0f} MB "
                      f"({peak / (n * 4 / 2**20):.2f}x the parameters)")
                print("| allocated at | MB live at the peak |")
                print("| --- | --- |")
                for origin, mb in rows[: args.top]:
                    print(f"| {origin} | {mb:.0f} |")
                del step
    return 0


if __name__ == "__main__":
    sys.exit(main())
