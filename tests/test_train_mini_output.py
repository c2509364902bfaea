"""`stepstream train-mini`'s OUT_DIR is checked before minutes of training, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from runtime.cli import main as cli_main  # noqa: E402
from tests.helpers.cli_output import error_line  # noqa: E402


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    import convert.train.trainer as trainer

    def train(*a, **k):
        raise AssertionError("training started before OUT_DIR was checked")

    monkeypatch.setattr(trainer, "train", train)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_place_is_one_line(capsys):
    assert cli_main(["train-mini", "/proc/tm"]) == 2
    line = error_line(capsys)
    assert "/proc/tm" in line and "cannot write" in line


def test_missing_parent_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "no" / "tm"
    assert cli_main(["train-mini", str(out)]) == 2
    assert f"{out.parent} does not exist" in error_line(capsys)
    assert not out.parent.exists()


@pytest.mark.parametrize("kind, says", [("file", "not a directory"), ("full", "not empty")])
def test_an_unusable_out_dir_is_refused(tmp_path, capsys, kind, says):
    out = tmp_path / "tm"
    if kind == "file":
        out.write_text("keep")
    else:
        out.mkdir()
        (out / "x").write_text("keep")
    assert cli_main(["train-mini", str(out)]) == 2
    assert str(out) in (line := error_line(capsys)) and says in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tm"]  # the probe left nothing


def test_a_usable_out_dir_goes_on_to_training(tmp_path):
    with pytest.raises(AssertionError, match="training started"):
        cli_main(["train-mini", str(tmp_path / "tm")])
    assert list(tmp_path.iterdir()) == []  # the probe left nothing
