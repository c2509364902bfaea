"""The package layers: every import in the four packages goes down, never up, and no package
imports another in a cycle.

A package is a directory holding an ``__init__.py`` (``runtime.model``, ``quant.int8_kernels``,
...); a module belongs to the package of its directory. Every import counts: module-level
and function-level ``import`` / ``from ... import`` (relative ones resolved), and every string
constant that is the dotted path of a project module (``importlib.import_module("runtime.cli.run")``, a
``-m`` argument of a child process). ``LAYERS`` lists the packages from the ground up, as
the README's architecture section does.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("runtime", "quant", "offload", "convert")

# Bottom to top. A package may import only packages listed before it (and itself).
LAYERS = (
    "runtime.base",          # errors, system facts, GGUF file and schema, model config, options
    "quant",                 # formats, reference codecs, quantizers, packed matrices, Numba helpers
    "quant.float_kernels",   # float32-activation kernels (the fallback)
    "quant.int8_kernels",    # int8-activation kernels (the default)
    "quant.cuda_kernels",    # CUDA (numba-cuda) quantized kernels of the GPU tier
    "quant.bench",           # the kernels' benchmark
    "runtime.text",          # tokenizer and chat template
    "runtime.generation",    # sampling, the token loop, OpenAI-shaped results, perplexity
    "runtime.model",         # the Step-3.5 model: weights, blocks, KV cache, decode plan, expert provider
    "runtime.model.gpu",     # the GPU tier's decode step, its KV cache in VRAM, its small kernels
    "offload",               # streaming expert provider: cache, O_DIRECT reads, placement, profiles
    "convert",               # Hugging Face checkpoint -> GGUF, miniature checkpoints
    "convert.train",         # training the miniature (torch)
    "runtime",               # the composition root: load()
    "runtime.bench",         # benchmarks and reports
    "runtime.server",        # the OpenAI-compatible HTTP server (FastAPI)
    "runtime.cli",           # the `stepstream` command line
)


def packages() -> dict[str, Path]:
    out = {}
    for top in TOP:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            out[".".join(rel.parts)] = init.parent
    return out


def modules() -> dict[str, Path]:
    out = {}
    for top in TOP:
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def package_of(module: str, pkgs) -> str:
    while module not in pkgs:
        module = module.rpartition(".")[0]
    return module


def imported_modules(name: str, path: Path, mods) -> set[str]:
    """Project modules that `name` (at `path`) imports, by any of the means in the module doc."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str, member: str | None = None) -> None:
        if member is not None and f"{target}.{member}" in mods:
            found.add(f"{target}.{member}")
        elif target in mods:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                add(base, alias.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                and node.value in mods:  # a dotted module path: importlib, or `python -m`
            found.add(node.value)
    return found


def package_graph() -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: [modules that import it]}}, self-imports left out."""
    pkgs, mods = packages(), modules()
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in pkgs}
    for name, path in mods.items():
        src = package_of(name, pkgs)
        for target in imported_modules(name, path, mods):
            dst = package_of(target, pkgs)
            if dst != src:
                graph[src].setdefault(dst, []).append(name)
    return graph


def find_cycle(graph) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(p: str):
        state[p] = 1
        path.append(p)
        for q in sorted(graph[p]):
            if state.get(q) == 1:
                return path[path.index(q):] + [q]
            if q not in state:
                cycle = visit(q)
                if cycle:
                    return cycle
        path.pop()
        state[p] = 2
        return None

    for p in sorted(graph):
        if p not in state:
            cycle = visit(p)
            if cycle:
                return cycle
    return None


def test_imports_are_found_by_every_means(tmp_path):
    """The scanner sees function-level imports, relative imports and module names in strings."""
    mods = {"runtime.cli": None, "runtime.cli.run": None, "runtime.model": None, "runtime.model.block": None,
            "quant": None, "quant.formats": None}
    src = tmp_path / "x.py"
    src.write_text("import importlib\n"
                   "def f():\n    from runtime.model import block\n"
                   "from .. import formats\n"
                   "M = {'run': 'runtime.cli.run'}\n")
    got = imported_modules("quant.int8_kernels.x", src, mods)
    assert got == {"runtime.model.block", "quant.formats", "runtime.cli.run"}, got


def test_no_package_cycle():
    cycle = find_cycle(package_graph())
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_every_package_has_a_layer():
    assert sorted(packages()) == sorted(LAYERS), (sorted(set(packages()) ^ set(LAYERS)))


def test_imports_go_down_the_layers():
    rank = {p: i for i, p in enumerate(LAYERS)}
    upward = [f"{src} -> {dst} (in {', '.join(sorted(set(by)))})"
              for src, deps in package_graph().items() for dst, by in deps.items() if rank[dst] > rank[src]]
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)
