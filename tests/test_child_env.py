"""Our own modules in child processes ignore modules in the user's working directory (a
review: a quant.py where the user stood broke `stepstream bench-serve` and the compile helper)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runtime.base.child import PROJECT_ROOT, child_env


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH arrived in Python 3.11")
def test_a_quant_py_in_the_working_directory_does_not_shadow_ours(tmp_path):
    (tmp_path / "quant.py").write_text("X = 1\n")
    (tmp_path / "runtime").mkdir()  # a package of the same name, empty
    (tmp_path / "runtime" / "__init__.py").write_text("")
    probe = "import quant, runtime; print(quant.__file__); print(runtime.__file__)"
    shadowed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                              env={k: v for k, v in child_env().items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")})
    assert str(tmp_path) in shadowed.stdout  # the hazard: without the environment, the user's files win
    ours = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=child_env())
    assert ours.returncode == 0, ours.stderr
    assert all(line.startswith(PROJECT_ROOT) for line in ours.stdout.split()), ours.stdout


def test_bench_serve_runs_its_server_from_a_directory_holding_a_quant_py(tmp_path):
    """The reviewer's command, cut to a server that starts and answers /health."""
    from runtime.bench.serve import started_server
    from runtime.cli.bench_serve import serve_argv

    (tmp_path / "quant.py").write_text("X = 1\n")
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        with started_server(serve_argv(os.path.join(PROJECT_ROOT, "runtime/data/step35-mini-q4_k_m.gguf")),
                            timeout=300) as url:
            import urllib.request

            assert urllib.request.urlopen(url + "/health", timeout=30).status == 200
    finally:
        os.chdir(here)
