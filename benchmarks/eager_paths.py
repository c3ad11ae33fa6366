"""The two eager paths of ``scale_by_adam`` side by side: torch's fused Adam kernel run on new
tensors (the default where it applies) and the ``_foreach`` path (used under ``torch.compile``
and for inputs the kernel cannot take), in an ``fo.adamw`` step with ``fo.apply_updates``, next
to torch.optim.AdamW (foreach and fused, in place). One process, the shapes of
``step_speed.py``; x floor = time / (28 bytes per parameter / copy bandwidth).

Usage: ``python benchmarks/eager_paths.py --device cuda --cases b,gpt184,a``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from funcopt.transforms import first_order

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_speed as ss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cases", default="b,gpt184,a")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    fusable = first_order._fusable
    gpu = args.device.startswith("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if gpu else 'cpu'}\n")
    print("| case | contender | ms/step | x floor |\n| --- | --- | --- | --- |")
    for case in args.cases.split(","):
        shapes = ss.shapes_for(case, args.device)
        n = sum(torch.Size(s).numel() for s in shapes)
        floor = n * 28 / ss.copy_bandwidth(args.device)
        for name in ("torch-foreach", "torch-fused", "funcopt-eager (fused kernel)",
                     "funcopt-eager (_foreach path)"):
            first_order._fusable = (lambda *a: False) if "_foreach" in name else fusable
            if name.startswith("torch"):
                step = ss.torch_optim(name.split("-")[1], "adamw")(shapes, args.device)
            else:
                step = ss.funcopt_setup("adamw", "eager")(shapes, args.device)
            t = ss.timeit(step, args.device, repeat=args.repeat)
            print(f"| {case} | {name} | {t * 1e3:.3f} | {t / floor:.2f} |")
            del step
        first_order._fusable = fusable


if __name__ == "__main__":
    main()
