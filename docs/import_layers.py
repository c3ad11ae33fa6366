"""Print which funcopt layer imports which (ARCHITECTURE.md's "What each layer imports").

    python docs/import_layers.py

Reads every module under funcopt/ with ``ast`` (nothing is imported), maps it to its layer and
lists the imports that point to a higher layer and any cycle of top-level imports. An import
inside a function is "lazy" (it runs on the first call, after every module has loaded).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "funcopt"

LAYERS = {  # first component under funcopt/ -> (layer number, layer name)
    "engine": (1, "leaf engine"), "base": (2, "contract"),
    "transforms": (3, "transforms"), "schedules": (3, "schedules"), "solvers": (3, "solvers"),
    "func": (3, "torch.func utilities"),
    "compose": (2, "combinators"), "wrappers": (4, "wrappers"), "lookahead": (4, "wrappers"),
    "aliases": (4, "aliases"),
    "heavyball3": (4, "aliases"), "heavyball": (4, "aliases"), "tree": (2, "contract"),
    "torch_kernels": (3, "transforms"), "triton_kernels": (3, "transforms"),
    "least_squares": (5, "drivers"), "least_squares_batched": (5, "drivers"),
    "least_squares_options": (5, "drivers"), "least_squares_probe": (5, "drivers"),
    "least_squares_stalls": (5, "drivers"),
    "least_squares_parallel": (5, "drivers"), "batch_size_loop": (5, "drivers"),
    "data": (6, "main job"),
    "optim": (6, "interop"), "optim_flat": (6, "interop"), "optim_hyperparams": (6, "interop"), "distributed": (6, "interop"), "checkpoint": (6, "interop"),
    "flat": (6, "interop"), "flat_jit": (6, "interop"), "testing": (6, "interop"),
    "bench": (6, "main job"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return 7 if len(parts) == 1 else LAYERS[parts[1]][0]


def imports(modules: dict[str, Path]) -> dict[tuple[str, str], set[str]]:
    """(importer, imported) -> {"top", "lazy"} over funcopt's own modules."""
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

        def visit(node: ast.AST, lazy: bool, name: str = name, package: str = package) -> None:
            for child in ast.iter_child_nodes(node):
                if (isinstance(child, ast.If) and isinstance(child.test, ast.Name)
                        and child.test.id == "TYPE_CHECKING"):
                    continue  # imports for type checkers only: nothing runs them
                inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        up = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(up + ([base] if base else []))
                    subs = [f"{base}.{a.name}" for a in child.names]
                    targets = [s for s in subs if s in modules] or [base]
                for target in targets:
                    while target not in modules and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target in modules and target != name:
                        edges[(name, target)].add("lazy" if inner else "top")
                visit(child, inner)

        visit(ast.parse(path.read_text()), False)
    return edges


def cycles(edges: dict[tuple[str, str], set[str]]) -> list[list[str]]:
    """Strongly connected components (size > 1) of the top-level import graph, package
    re-exports (a package importing its own submodules) left out."""
    graph: dict[str, set[str]] = defaultdict(set)
    for (a, b), kinds in edges.items():
        if "top" in kinds and not b.startswith(a + ".") and not a.startswith(b + "."):
            graph[a].add(b)
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in graph[v]:
            if w not in order:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in order:
            strong(v)
    return found


def main() -> int:
    sys.setrecursionlimit(10_000)
    modules = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    edges = imports(modules)
    by_layer: dict[int, set[int]] = defaultdict(set)
    upward = []
    for (a, b), kinds in sorted(edges.items()):
        if a == "funcopt" or b.startswith(a + "."):
            continue  # the package's re-exports
        by_layer[layer(a)].add(layer(b))
        if layer(a) < layer(b):
            upward.append(f"  {a} (layer {layer(a)}) -> {b} (layer {layer(b)}), "
                          f"{'/'.join(sorted(kinds))}")
    print(f"{len(modules)} modules, {len(edges)} import edges")
    for n in sorted(by_layer):
        print(f"layer {n} imports layers {sorted(by_layer[n])}")
    print("imports of a higher layer:")
    print("\n".join(upward) or "  none")
    print("cycles of top-level imports:", cycles(edges) or "none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
