"""Optimizer step time against peers and against the memory-bandwidth floor.

An element-wise optimizer step must read and write each parameter and state byte once. For a
method that reads R and writes W bytes per parameter, the floor is ``N * (R + W) / B`` where B is
the device-to-device copy bandwidth measured in the same run (bytes read + written per second):

    AdamW fp32:        read p, g, m, v; write p, m, v  -> 28 bytes/param
    SGD momentum fp32: read p, g, b;    write p, b     -> 20 bytes/param
    Lion fp32:         read p, g, m;    write p, m     -> 20 bytes/param

Cases (GPU; the CPU mode scales N down and prints ratios only):
    a: 1e9 parameters in 200 tensors      (bandwidth-bound)
    b: 1e7 parameters in 1000 tensors     (launch-bound)
    c: a small transformer's and a ResNet-like CNN's parameter shapes
    gpt184: a 184M-parameter transformer in 121 tensors (d=1024, 10 layers, vocab 56,704),
            the size of the heavyball comparison (AdamW, SOAP, PSGD Kron, Muon)

Peers that are not installed are skipped: heavyball 3.2.1, TorchOpt 0.7.3 (``pip install
torchopt graphviz``), optax with jax on a GPU.

Columns: time per step (CUDA-event median on a GPU, host clock on a CPU), the multiple of the
floor, the peak memory the contender allocated (GPU), and the minor page faults per step: on a
CPU a step that allocates large new buffers (a pure step's outputs) makes the kernel map and
zero fresh pages on first touch, which can cost more than the arithmetic.

SOAP, PSGD Kron and Muon are not element-wise (no floor): their rows report the *mean* step
time over the repeats, since their preconditioner work recurs every few steps.

Usage:
    python benchmarks/step_speed.py --device cuda --cases a,b,c
    python benchmarks/step_speed.py --device cpu --cases mlp,b
    python benchmarks/step_speed.py --device cpu --cases mlp --threads 1 --turns --repeat 2000
    python benchmarks/step_speed.py --device cuda --cases gpt184 --methods soap,psgd,muon
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

import funcopt as fo

WD = 1e-2
LR = 1e-3


# --------------------------------------------------------------------------- shapes


def shapes_for(case: str, device: str) -> list[tuple[int, ...]]:
    gpu = device.startswith("cuda")
    if case == "a":
        n, k = (10**9, 200) if gpu else (2 * 10**7, 200)
        return [(n // k,)] * k
    if case == "b":
        n, k = (10**7, 1000) if gpu else (10**6, 1000)
        return [(n // k,)] * k
    if case == "mlp":  # the 85k-parameter MLP of FACTS.md (784-100-64-10 ... close enough)
        return [(100, 784), (100,), (64, 100), (64,), (10, 64), (10,)]
    if case == "transformer":  # 6 layers, d=512, vocab 8192
        d, layers, v = 512, 6, 8192
        per = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
        return [(v, d)] + per * layers + [(d,), (d,)]
    if case == "gpt184":
        d, layers, v = 1024, 10, 56_704
        per = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
        return [(v, d)] + per * layers
    if case == "resnet":  # ResNet-18-like conv shapes
        out, chans = [(64, 3, 7, 7), (64,), (64,)], [64, 128, 256, 512]
        cin = 64
        for c in chans:
            for _ in range(2):
                out += [(c, cin, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]
                cin = c
        return out + [(1000, 512), (1000,)]
    raise SystemExit(f"unknown case {case!r}")


# --------------------------------------------------------------------------- timing


def timeit(fn, device: str, repeat: int, warmup: int = 3, mean: bool = False) -> float:
    """Median (or mean) seconds per call."""
    pick = statistics.mean if mean else statistics.median
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return pick(times)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return pick(times)


def timeit_turns(fns: list, device: str, repeat: int, block: int = 20, warmup: int = 3) -> list[float]:
    """Median seconds per call of each function, the functions taking turns in blocks of
    ``block`` calls (each block timed as a whole), so that a drift in the machine's speed hits
    all of them alike."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeat // block)):
        for fn, ts in zip(fns, times):
            sync()
            t = time.perf_counter()
            for _ in range(block):
                fn()
            sync()
            ts.append((time.perf_counter() - t) / block)
    return [statistics.median(ts) for ts in times]


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = 2**28 if device.startswith("cuda") else 2**25
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, repeat=20)
    return 2 * n * 4 / t


# --------------------------------------------------------------------------- contenders


def make_tensors(shapes, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, device=device, generator=g) for s in shapes]


def torch_optim(kind: str, method: str):
    def setup(shapes, device):
        if method not in ("adamw", "sgd"):
            return None
        params = [torch.nn.Parameter(t) for t in make_tensors(shapes, device)]
        grads = make_tensors(shapes, device, seed=1)
        for p, g in zip(params, grads):
            p.grad = g
        flag = {"foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
        if method == "adamw":
            opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, **flag)
        elif method == "sgd":
            opt = torch.optim.SGD(params, lr=LR, momentum=0.9, **flag)
        else:
            return None
        return opt.step

    return setup


HEAVYBALL_COMPILE = "max-autotune-no-cudagraphs"  # heavyball 3.2.1's default compile mode


def heavyball_setup(method: str, compiled: bool):
    """heavyball 3.2.1 with its own compile mode (``compiled``) or eagerly. Settings follow
    funcopt_tx: SOAP/PSGD/Muon at their defaults except the learning rate."""

    def setup(shapes, device):
        try:
            import heavyball
        except ImportError:
            return None
        heavyball.utils.compile_mode = HEAVYBALL_COMPILE if compiled and device != "cpu" else None
        params = [torch.nn.Parameter(t) for t in make_tensors(shapes, device)]
        grads = make_tensors(shapes, device, seed=1)
        make = {
            "adamw": lambda: heavyball.AdamW(params, lr=LR, weight_decay=WD),
            "soap": lambda: heavyball.SOAP(params, lr=3e-3, betas=(0.9, 0.95), shampoo_beta=0.95),
            "psgd": lambda: heavyball.PSGDKron(params, lr=LR),
            "muon": lambda: heavyball.Muon(params, lr=0.02),
        }.get(method)
        if make is None:
            return None
        opt = make()

        def step():
            for p, g in zip(params, grads):
                p.grad = g  # heavyball sets p.grad to None after each step
            opt.step()

        return step

    return setup


def torchopt_setup(method: str, accelerated: bool):
    """TorchOpt 0.7.3's functional optimizer with its defaults (in-place updates), optionally
    with its fused C++/CUDA Adam op (``use_accelerated_op``)."""

    def setup(shapes, device):
        try:
            import torchopt
        except ImportError:
            return None
        if method == "adamw":
            opt = torchopt.adamw(LR, weight_decay=WD, use_accelerated_op=accelerated)
        elif method == "sgd" and not accelerated:
            opt = torchopt.sgd(LR, momentum=0.9)
        else:
            return None
        params = tuple(make_tensors(shapes, device))
        grads = tuple(make_tensors(shapes, device, seed=1))
        box = {"s": opt.init(params)}

        def step():
            updates, box["s"] = opt.update(grads, box["s"], params=params)
            torchopt.apply_updates(params, updates)

        return step

    return setup


def funcopt_tx(method: str) -> fo.GradientTransformation:
    if method == "adamw":
        return fo.adamw(LR, weight_decay=WD)
    if method == "sgd":
        return fo.sgd(LR, momentum=0.9)
    if method == "lion":
        return fo.lion(LR, weight_decay=WD)
    if method == "soap":  # heavyball's defaults: betas (0.9, 0.95), shampoo_beta 0.95, every 2 steps
        return fo.soap(3e-3, 0.9, 0.95, shampoo_beta=0.95)
    if method == "psgd":
        return fo.psgd_kron(LR)
    if method == "muon":  # heavyball's momentum 0.9 and bfloat16 Newton-Schulz
        return fo.muon(0.02, beta=0.9, ns_dtype=torch.bfloat16)
    raise SystemExit(f"unknown method {method}")


def funcopt_setup(method: str, mode: str):
    """mode: "eager" (pure tree update + apply_updates), "compiled" (the same under
    torch.compile), "flatten-eager" / "flatten" (fo.flatten(tx) on the tree, eager / compiled),
    "ravel" (parameters stored flat with fo.ravel, gradients taken w.r.t. the buffer, compiled
    step), "ravel-flatten" (fo.flatten(tx) on that flat storage, compiled); "-donated" wraps the
    step in fo.donated. A "-graph" suffix captures the step with fo.cuda_graph: "eager-graph"
    the pure eager tree step, "ravel-graph" the compiled fo.donated flat step.
    torch.compile's own CUDA graphs (mode="reduce-overhead") have no contender: torch 2.11 skips
    them for a step that writes into its inputs ("skipping cudagraphs due to mutated inputs"),
    and under them a pure step's outputs live in the graph's memory, which the next replay
    overwrites while reading them as its inputs ("accessing tensor output of CUDAGraphs that
    has been overwritten")."""
    graph = mode.endswith("-graph")
    if graph:
        mode = {"eager-graph": "eager", "ravel-graph": "ravel-donated"}[mode]

    def setup(shapes, device):
        if graph and not device.startswith("cuda"):
            return None
        tx = funcopt_tx(method)
        if mode != "eager" and method in SHAPED and mode != "compiled":
            return None  # flat storage is for element-wise methods
        if "flatten" in mode:
            tx = fo.flatten(tx)
        params = make_tensors(shapes, device)
        grads = make_tensors(shapes, device, seed=1)
        if mode.startswith("ravel"):
            params, _ = fo.ravel(params)
            grads, _ = fo.ravel(grads)
        box = {"p": params, "s": tx.init(params)}

        def step_fn(p, s, g):
            u, s = tx.update(g, s, p)
            return fo.apply_updates(p, u), s

        if "donated" in mode:
            step_fn = fo.donated(step_fn)
        if mode.endswith("eager"):
            fn = step_fn
        else:
            fn = torch.compile(step_fn, fullgraph=True)

        if graph:
            fn = fo.cuda_graph(fn, box["p"], box["s"], grads)

        def step():
            box["p"], box["s"] = fn(box["p"], box["s"], grads)

        return step

    return setup


def funcopt_jit_setup(method: str):
    """The one-call fast path: the pure step given to ``fo.jit`` (compiled, donated, captured
    as a CUDA graph on a GPU), on parameters stored flat for element-wise methods (made flat
    from the start, as a model raveled before its gradients and state exist) and on the list
    of tensors for shape-aware ones (Muon)."""

    def setup(shapes, device):
        tx = funcopt_tx(method)
        if method in SHAPED:  # shape-aware: the step runs on the list of tensors
            box = {"p": make_tensors(shapes, device)}
            grads = make_tensors(shapes, device, seed=1)
        else:
            n = sum(torch.Size(s).numel() for s in shapes)
            g = torch.Generator(device=device).manual_seed(0)
            box = {"p": torch.randn(n, device=device, generator=g)}
            grads = torch.randn(n, device=device, generator=g)
        box["s"] = tx.init(box["p"])

        def step_fn(p, s, gr):
            u, s = tx.update(gr, s, p)
            return fo.apply_updates(p, u), s

        fast = fo.jit(step_fn)

        def step():
            box["p"], box["s"] = fast(box["p"], box["s"], grads)

        return step

    return setup


def funcopt_adapter_setup(method: str):
    """``fo.Optimizer(params, tx)`` as a PyTorch user meets it: parameters as
    ``nn.Parameter``s, gradients made by one real backward (the adapter's hooks move each into
    its flat buffer as it arrives), then ``opt.step()`` timed."""

    def setup(shapes, device):
        params = [torch.nn.Parameter(t) for t in make_tensors(shapes, device)]
        opt = fo.Optimizer(params, funcopt_tx(method))
        weights = torch.rand(len(params), device=device)
        sum((p * w).sum() for p, w in zip(params, weights)).backward()
        return opt.step

    return setup


def optax_setup(method: str):
    """optax under jax.jit with the parameters and state donated (GPU machine only)."""

    def setup(shapes, device):
        if not device.startswith("cuda"):
            return None
        try:
            import jax
            import optax
        except ImportError:
            return None
        if jax.default_backend() != "gpu":
            return None
        tx = {"adamw": lambda: optax.adamw(LR, weight_decay=WD), "sgd": lambda: optax.sgd(LR, momentum=0.9),
              "lion": lambda: optax.lion(LR, weight_decay=WD)}[method]()
        keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
        params = [jax.random.normal(k, s, dtype="float32") for k, s in zip(keys, shapes)]
        grads = [jax.random.normal(k, s, dtype="float32") for k, s in zip(jax.random.split(keys[0], len(shapes)), shapes)]
        box = {"p": params, "s": tx.init(params)}

        @jax.jit
        def _step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        step_jit = jax.jit(_step, donate_argnums=(0, 1))

        def step():
            box["p"], box["s"] = step_jit(box["p"], box["s"], grads)
            jax.block_until_ready(box["p"])  # CUDA events cannot see JAX's stream: time the host

        return step

    return setup


BYTES = {"adamw": 28, "sgd": 20, "lion": 20}
SHAPED = ("soap", "psgd", "muon")  # not element-wise: no floor, mean step time


def floor_seconds(n: int, method: str, bandwidth: float) -> float:
    """The step's memory-bandwidth floor ``n * BYTES[method] / bandwidth`` in seconds for ``n``
    parameters and a copy bandwidth in bytes read + written per second; nan for a method that
    is not element-wise (no floor)."""
    return n * BYTES[method] / bandwidth if method in BYTES else float("nan")


def contenders(method: str, which: list[str]):
    table = {
        "torch-foreach": torch_optim("foreach", method),
        "torch-fused": torch_optim("fused", method),
        "heavyball": heavyball_setup(method, compiled=True),
        "heavyball-eager": heavyball_setup(method, compiled=False),
        "funcopt-eager": funcopt_setup(method, "eager"),
        "funcopt-compiled": funcopt_setup(method, "compiled"),
        "funcopt-flatten-eager": funcopt_setup(method, "flatten-eager"),
        "funcopt-flatten": funcopt_setup(method, "flatten"),
        "funcopt-ravel": funcopt_setup(method, "ravel"),
        "funcopt-ravel-flatten": funcopt_setup(method, "ravel-flatten"),
        "funcopt-ravel-flatten-donated": funcopt_setup(method, "ravel-flatten-donated"),
        "funcopt-ravel-donated": funcopt_setup(method, "ravel-donated"),
        "funcopt-jit": funcopt_jit_setup(method),
        "funcopt-adapter": funcopt_adapter_setup(method),
        "funcopt-eager-graph": funcopt_setup(method, "eager-graph"),
        "funcopt-ravel-graph": funcopt_setup(method, "ravel-graph"),
        "torchopt": torchopt_setup(method, accelerated=False),
        "torchopt-accelerated": torchopt_setup(method, accelerated=True),
        "optax": optax_setup(method) if method not in SHAPED else lambda *a: None,
    }
    return {k: v for k, v in table.items() if not which or k in which}


def _minor_faults() -> int:
    """Minor page faults of this process so far (the kernel mapping fresh memory on first
    touch: what a step that allocates large new buffers pays on a CPU)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_one_by_one(table, shapes, dev, repeat, method):
    """Yield (name, seconds, peak MB, minor page faults per step, error) per contender, each
    set up, timed and freed in turn; on an error only the name and the message."""
    for name, setup in table.items():
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        try:
            step = setup(shapes, dev)
            if step is None:
                continue
            step()  # the first call (compilation) is not counted
            faults = _minor_faults()
            t = timeit(step, dev, repeat, mean=method in SHAPED)
            faults = (_minor_faults() - faults) / (repeat + 3)  # timeit's warm-up calls too
        except Exception as e:  # report, keep going
            yield name, None, None, None, f"{type(e).__name__}: {str(e)[:80]}"
            continue
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.startswith("cuda") else None
        del step
        yield name, t, peak, faults, None


def measure_in_turns(table, shapes, dev, repeat, method):
    """Set up every contender, then time them taking turns (``timeit_turns``); no peak memory
    or page-fault counts."""
    steps = {}
    for name, setup in table.items():
        try:
            step = setup(shapes, dev)
            if step is not None:
                for _ in range(3):  # warm up (and compile) here: a failing one is reported
                    step()
                steps[name] = step
        except Exception as e:
            yield name, None, None, None, f"{type(e).__name__}: {str(e)[:80]}"
    for name, t in zip(steps, timeit_turns(list(steps.values()), dev, repeat, warmup=0)):
        yield name, t, None, None, None


def main(argv=None) -> int:
    global HEAVYBALL_COMPILE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="mlp,b")
    ap.add_argument("--methods", default="adamw")
    ap.add_argument("--contenders", default="")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", help="also write every row as JSON to this file")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--heavyball-compile", default=HEAVYBALL_COMPILE,
                    help="torch.compile mode of the `heavyball` contender (default: heavyball's own)")
    ap.add_argument("--turns", action="store_true",
                    help="set up all contenders first, then time them taking turns in blocks of 20 "
                         "steps (needs memory for all of them at once; for small cases)")
    args = ap.parse_args(argv)
    dev = args.device
    HEAVYBALL_COMPILE = args.heavyball_compile
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = copy_bandwidth(dev)
    print(f"# device {dev} ({torch.cuda.get_device_name() if dev.startswith('cuda') else 'cpu'}), "
          f"torch {torch.__version__}, copy bandwidth {bw / 1e9:.1f} GB/s")
    rows = []
    for case in args.cases.split(","):
        shapes = shapes_for(case, dev)
        n = sum(torch.Size(s).numel() for s in shapes)
        for method in args.methods.split(","):
            floor = floor_seconds(n, method, bw)
            print(f"\n## case {case}: {n:,} params in {len(shapes)} tensors, {method}, "
                  + (f"floor {floor * 1e3:.3f} ms" if method in BYTES else "mean step time (no floor)"))
            print("| contender | ms/step | x floor | peak MB | page faults/step |")
            print("| --- | --- | --- | --- | --- |")
            table = contenders(method, [c for c in args.contenders.split(",") if c])
            measure = measure_in_turns if args.turns else measure_one_by_one
            for name, t, peak, faults, error in measure(table, shapes, dev, args.repeat, method):
                if error is not None:
                    print(f"| {name} | error: {error} | | | |")
                    continue
                rows.append({"case": case, "method": method, "contender": name, "n": n,
                             "tensors": len(shapes), "s": t, "floor_s": floor, "peak_mb": peak,
                             "faults_per_step": faults})
                ratio = "-" if method in SHAPED else f"{t / floor:.2f}"
                print(f"| {name} | {t * 1e3:.3f} | {ratio} | {'-' if peak is None else f'{peak:.0f}'} "
                      f"| {'-' if faults is None else f'{faults:.0f}'} |")
                sys.stdout.flush()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "bandwidth": bw, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
