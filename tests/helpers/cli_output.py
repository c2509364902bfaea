"""What a command printed to stderr, checked as the project promises it: one error line."""

from __future__ import annotations


def error_line(capsys) -> str:
    """The only non-empty stderr line, which must start with 'error: '."""
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]
