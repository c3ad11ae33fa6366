"""A whole training step (forward, backward, AdamW) on a GPU: eager against CUDA-graph capture.

Small models train at the pace of the host: every layer's forward and backward kernels and the
optimizer's launch from Python. A captured step replays them all in one launch. Contenders,
all AdamW (lr 1e-3, weight decay 1e-2) on an MLP with cross-entropy, one fixed batch:

* ``torch-eager``: ``nn.Module`` forward, ``loss.backward()``, ``torch.optim.AdamW(fused=True)``;
* ``torch-graph``: the same step captured by hand as in the CUDA-graphs section of the PyTorch
  docs (static batch, ``capturable=True``, warm-up on a side stream, ``torch.cuda.graph``);
* ``funcopt-eager``: ``torch.func.grad`` of the loss over the parameter dict, ``fo.adamw``
  pure update and ``fo.apply_updates``;
* ``funcopt-graph``: that step captured with ``fo.cuda_graph(train_step, params, state, x, y)``.

After the timed steps every contender has taken the same number of steps from the same start;
the script prints the largest parameter difference of each against ``torch-eager``.

Usage: ``python benchmarks/train_step.py [--widths 256,1024,4096] [--batch 128] [--repeat 200]
[--contenders torch-eager,torch-graph,funcopt-eager,funcopt-graph]``

A captured step reads and writes its tensors at the addresses they had at capture, so
whatever owns them must live as long as the graph: here the optimizer, whose state tensors
nothing else holds (``fo.cuda_graph`` holds the step for the same reason).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from step_speed import timeit  # noqa: E402

import funcopt as fo  # noqa: E402

LR, WD = 1e-3, 1e-2


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)).cuda()


def torch_setup(width, x, y, graph: bool):
    model = mlp(width)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True,
                            capturable=graph)

    def step():
        if not graph:  # a captured step keeps its gradients in the graph's pool and overwrites them
            opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    if not graph:
        return step, model.state_dict
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)  # backward in the capture makes the .grad tensors
    with torch.no_grad():  # undo the warm-up, so that all contenders start alike
        for k, v in model.state_dict().items():
            v.copy_(start[k])
        for s in opt.state.values():
            for v in s.values():
                v.zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):  # the warmed stream, as fo.cuda_graph does
        step()

    def replay(keep=opt):  # the graph writes opt's state in place: opt must outlive it
        g.replay()

    return replay, model.state_dict


def funcopt_setup(width, x, y, graph: bool):
    model = mlp(width)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx = fo.adamw(LR, weight_decay=WD)

    def loss(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    def train_step(p, s, x, y):
        g = torch.func.grad(loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return fo.apply_updates(p, u), s

    box = {"p": params, "s": tx.init(params)}
    fn = fo.cuda_graph(train_step, box["p"], box["s"], x, y) if graph else train_step

    def step():
        box["p"], box["s"] = fn(box["p"], box["s"], x, y)

    return step, lambda: box["p"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="a CUDA device (CUDA graphs)")
    ap.add_argument("--widths", default="256,1024,4096")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--contenders", default="torch-eager,torch-graph,funcopt-eager,funcopt-graph",
                    help="the first is the reference of the ratio and difference columns")
    args = ap.parse_args(argv)
    if not (args.device.startswith("cuda") and torch.cuda.is_available()):
        raise SystemExit(f"train_step.py times CUDA graphs: --device {args.device} is not an "
                         "available CUDA device; run it on a GPU")
    torch.cuda.set_device(torch.device(args.device))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, "
          f"median of {args.repeat} CUDA-event-timed steps\n")
    print("| width | params | contender | ms/step | vs the first | max param diff vs the first |")
    print("| --- | --- | --- | --- | --- | --- |")
    setups = {"torch-eager": (torch_setup, False), "torch-graph": (torch_setup, True),
              "funcopt-eager": (funcopt_setup, False), "funcopt-graph": (funcopt_setup, True)}
    names = args.contenders.split(",")
    for width in map(int, args.widths.split(",")):
        torch.manual_seed(1)
        x = torch.randn(args.batch, 784, device="cuda")
        y = torch.randint(0, 10, (args.batch,), device="cuda")
        made = {k: setups[k][0](width, x, y, setups[k][1]) for k in names}
        torch.cuda.synchronize()
        times = {k: timeit(step, "cuda", args.repeat) for k, (step, _) in made.items()}
        # the same step count for all: the warm-up (3) and the timed repeats
        final = {k: {n: v.float() for n, v in get().items()} for k, (_, get) in made.items()}
        ref = names[0]
        n = sum(v.numel() for v in final[ref].values())
        for k, t in times.items():
            diff = max((final[k][name] - r).abs().max().item()
                       for name, r in final[ref].items() if name in final[k])
            print(f"| {width} | {n:,} | {k} | {t * 1e3:.3f} | {t / times[ref]:.2f} | {diff:.1e} |")
        del made, final  # this width's graphs and tensors go before the next width's
        gc.collect()
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
