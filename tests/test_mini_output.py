"""`stepstream mini`'s OUT_DIR: checked before any work, in one line, as every other output is;
a missing parent directory is refused, not created."""

from __future__ import annotations

from pathlib import Path

import pytest

from convert.mini import write_mini
from runtime.base.errors import StepstreamError
from runtime.cli import main as cli_main
from tests.helpers.cli_output import error_line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_place_is_one_line(capsys):
    assert cli_main(["mini", "/proc/foo"]) == 2
    line = error_line(capsys)
    assert "/proc/foo" in line and "cannot write" in line


def test_missing_parent_directory_is_refused_not_created(tmp_path, capsys):
    out = tmp_path / "no" / "such" / "ckpt"
    assert cli_main(["mini", str(out)]) == 2
    line = error_line(capsys)
    assert str(out) in line and f"{out.parent} does not exist" in line
    assert not (tmp_path / "no").exists()
    with pytest.raises(StepstreamError, match="does not exist"):
        write_mini(out)
    assert not (tmp_path / "no").exists()


def test_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("keep")
    assert cli_main(["mini", str(tmp_path / "f")]) == 2
    assert "not a directory" in error_line(capsys)
    assert (tmp_path / "f").read_text() == "keep"
