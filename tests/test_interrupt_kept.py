"""Ctrl-C while numba loads its kernels is raised inside llvmlite's ctypes callbacks, which drop
it ("Exception ignored on calling ctypes callback function"): a review's run went on to exit 0.
runtime.cli.common.interrupts_kept re-raises it at the block's end. Here the signal arrives
inside a real ctypes callback (libc's qsort calling a Python comparator)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

import pytest

from runtime.cli.common import compiles_counted, interrupts_kept, warm_up_note


def _sort_with_a_signal_inside_the_callback():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    cmp = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
    sent = []

    def compare(a, b):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs inside this or the next call, in a callback
        return a[0] - b[0]

    values = (ctypes.c_int * 4)(3, 1, 2, 0)  # the comparison that raised returns 0: any order may come out
    libc.qsort(values, 4, ctypes.sizeof(ctypes.c_int), cmp(compare))


@pytest.fixture
def reported(monkeypatch):
    """What reaches sys.unraisablehook (ctypes' "Exception ignored" reports)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(type(u.exc_value).__name__))
    return seen


def test_without_the_guard_the_interrupt_is_lost(reported):
    _sort_with_a_signal_inside_the_callback()  # no KeyboardInterrupt comes out
    assert reported == ["KeyboardInterrupt"]  # only ctypes' report of the dropped exception


def test_the_guard_raises_it_at_the_end_and_reports_nothing(reported):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupts_kept():
            _sort_with_a_signal_inside_the_callback()
    assert reported == []
    assert signal.getsignal(signal.SIGINT) is before


def test_the_interrupt_wins_over_what_it_broke(reported):
    """The dropped interrupt can leave numba half-way through a compile, which then fails on its
    own ("RuntimeError: no compiled object yet", a review's cold-cache Ctrl-C, exit 1 with a
    traceback): the interrupt is what comes out."""
    with pytest.raises(KeyboardInterrupt) as e:
        with interrupts_kept():
            _sort_with_a_signal_inside_the_callback()
            raise RuntimeError("no compiled object yet for <Library 'gemm'>")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(RuntimeError):  # without a signal, the block's own error goes up as it was
        with interrupts_kept():
            raise RuntimeError("a real failure")


def test_a_quiet_block_raises_nothing():
    with interrupts_kept():
        pass


def test_the_note_says_compiled_only_when_numba_compiled():
    from numba import njit

    @njit
    def fresh(x):
        return x + 1

    with compiles_counted() as n:
        fresh(1)
    assert n[0] == 1
    with compiles_counted() as n:
        fresh(2)  # compiled already
    assert n[0] == 0
    assert warm_up_note(13.2, 0) == " done in 13 s"  # a review: "compiled in 13 s" on every run
    assert warm_up_note(13.2, 5).startswith(" compiled in 13 s (first run")
    assert warm_up_note(0.5, 0) == " done"
