"""Numba's cache: a fresh compile and its cached copy give the same numbers, the compile helper
builds what the model then calls, and the cache key follows every source a kernel inlines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quant import jit

_DIGEST = textwrap.dedent("""
    import hashlib, json, numpy as np, runtime
    from numba.core import event
    from runtime.cli.demo import model_path
    from runtime.model import precompile
    from runtime.model.decode_kernels import attention_half
    m = runtime.load(model_path(), n_ctx=64)
    precompile.main([json.dumps(precompile._spec(m))])   # as the compile helper's process would
    names = []
    class Compiles(event.Listener):
        def on_start(self, ev):
            names.append(ev.data["dispatcher"].py_func.__qualname__)
        def on_end(self, ev):
            pass
    event.register("numba:compile", Compiles())
    ids = np.random.default_rng(5).integers(0, m.cfg.vocab, 28).tolist()
    h = hashlib.sha256(m.logits(ids[:20]).tobytes())   # a prefill chunk, then decode steps
    for t in ids[20:]:
        h.update(m.eval([t]).tobytes())
    print(h.hexdigest(), sum(attention_half(m.int8).stats.cache_hits.values()), json.dumps(names))
""")


@pytest.mark.slow
def test_fresh_and_cached_kernels_give_identical_logits(tmp_path):
    """The default int8 prefill and decode of the shipped model, bit for bit, in a process that
    compiles every kernel and in one that loads them all from the cache. Before the fused decode
    kernel called its norms and attention as separately compiled fixed-order functions, they were
    inlined into its full fast-math body, and the two processes disagreed from the first decode step.

    The first process also checks the compile helper (runtime.model.precompile), which calls its
    kernels on empty inputs of the types the model passes: after it ran, the model's own prefill
    and decode compile none of them again (one fresh compile of the shipped model's kernels
    serves both checks)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True, timeout=1200, env=env)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-3000:]
    (fresh, hits_fresh, compiled), (cached, hits_cached, _) = (r.stdout.strip().splitlines()[-1].split(" ", 2)
                                                               for r in runs)
    assert hits_fresh == "0" and hits_cached == "1", (hits_fresh, hits_cached)
    assert fresh == cached
    compiled = set(json.loads(compiled))
    helpers = {"build.<locals>.gemv", "build.<locals>.gemm", "build.<locals>.swiglu_ffns", "build.<locals>.experts",
               "chunk_attention", "decode_attention", "router_logits"}
    assert not compiled & helpers, sorted(compiled & helpers)
    assert "attention_half.<locals>.attention_half" in compiled  # the listener saw the model's compiles


def test_source_stamp_covers_every_imported_project_module():
    """The stamp of the decode kernels' file changes with any module they inline, however deep."""
    root = Path(jit.__file__).resolve().parent.parent
    decode = str(root / "runtime" / "model" / "decode_kernels.py")
    closure = jit.imported_files(decode)
    for inlined in ("quant/int8_kernels/avx2.py", "quant/bits.py", "runtime/model/ops.py",
                    "runtime/model/attention_kernels.py", "quant/jit.py"):
        assert root / inlined in closure, inlined
    assert not any("offload" in str(p) or "cli" in str(p) for p in closure)


def _imports_by_ast(path: Path) -> set[Path]:
    """The reference for jit's import scanner: every Import / ImportFrom node of the parsed file."""
    import ast

    name = jit._module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        found |= {f for f in map(jit._module_file, targets) if f is not None}
    return found


def test_the_import_scanner_finds_what_the_parser_finds_in_every_project_file():
    """jit reads imports from the text, not the syntax tree (parsing took a third of a second of
    every process's start); on every file of the project both find the same project modules."""
    root = Path(jit.__file__).resolve().parent.parent
    files = sorted(p for pkg in jit.PACKAGES for p in (root / pkg).rglob("*.py"))
    assert len(files) > 100
    for p in files:
        assert jit._imports(p) == _imports_by_ast(p), p


def test_the_import_scanner_reads_every_form_of_import(tmp_path, monkeypatch):
    """Parenthesized lists over lines with comments, aliases, relative imports at any depth and
    imports inside functions, on a file written for the test (the project's files may not hold
    every form)."""
    pkg = tmp_path / "quant" / "sub"
    pkg.mkdir(parents=True)
    for rel in ("quant/__init__.py", "quant/sub/__init__.py", "quant/a.py", "quant/b.py", "quant/sub/c.py",
                "quant/sub/d.py", "runtime/__init__.py", "runtime/e.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    src = pkg / "x.py"
    src.write_text("import numpy as np, runtime.e as e\n"
                   "from .. import (a,   # the first\n"
                   "                b as bee)\n"
                   "def f():\n"
                   "    from . import c\n"
                   "    from .d import something\n")
    monkeypatch.setattr(jit, "_ROOT", tmp_path)
    want = {tmp_path / r for r in ("runtime/e.py", "quant/__init__.py", "quant/a.py", "quant/b.py",
                                   "quant/sub/__init__.py", "quant/sub/c.py", "quant/sub/d.py")}
    assert _imports_by_ast(src) == want
    assert jit._imports.__wrapped__(src) == want


def test_source_stamp_changes_when_an_inlined_source_changes(tmp_path):
    """A copy of the project where one deeply inlined file (quant/bits.py) gains a comment: the
    stamp of the decode kernels' file changes, that of a module not importing it does not."""
    import shutil

    root = Path(jit.__file__).resolve().parent.parent
    for pkg in jit.PACKAGES:
        shutil.copytree(root / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "data"))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import quant.jit as j; "
            "print(j.source_stamp(sys.argv[1] + '/runtime/model/decode_kernels.py'), "
            "j.source_stamp(sys.argv[1] + '/runtime/base/units.py'))")

    def stamps():
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()

    decode0, units0 = stamps()
    with open(tmp_path / "quant" / "bits.py", "a") as f:
        f.write("\n# an edit\n")
    decode1, units1 = stamps()
    assert decode1 != decode0 and units1 == units0
