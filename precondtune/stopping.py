"""Stopping on Ctrl-C and SIGTERM without tearing a storage write in half.

Python raises :class:`KeyboardInterrupt` wherever the main thread is when the signal comes, which inside a
search can be halfway through an Optuna storage call: the trial is left RUNNING, or the process's own open
SQLite transaction locks it out of the write that would fail the trial. Inside :func:`deferred` (around
``study.optimize`` and the seed re-runs) a first signal is only recorded, and :func:`check` raises it at the next
safe point: before a training step, before the final evaluation, between trials. A second Ctrl-C, or a signal
outside :func:`deferred`, raises at once. SIGTERM (``kill``, a scheduler preempting the job) raises :class:`Terminated`,
a :class:`KeyboardInterrupt`, so both stop the same way: the running trial fails with the reason and the study
resumes. ``precondtune`` exits 130 after Ctrl-C and 143 after SIGTERM.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C's :class:`KeyboardInterrupt` is."""


_pending: list[int] = []
"""The signal waiting for :func:`check`, if any."""
_depth = 0
_seen = False
"""A signal came inside the current outermost :func:`deferred` region (raised by :func:`check` or not)."""


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated("terminated (SIGTERM)") if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, _frame: Any) -> None:
    global _seen
    # a repeated SIGTERM is deferred too: a job scheduler signals every process of the group and precondtune passes
    # SIGTERM on to its workers, so a worker may get it twice without anyone asking for haste
    if _depth > 0 and (not _seen or signum == signal.SIGTERM):
        _seen = True
        if not _pending:
            _pending.append(signum)
        return
    _pending.clear()
    raise _exception(signum)


def install() -> None:
    """Handle Ctrl-C and SIGTERM as the module docstring says (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


@contextmanager
def deferred() -> Iterator[None]:
    """A region whose first Ctrl-C/SIGTERM waits for :func:`check`; one still pending at the end is raised. The
    outermost region forgets its signals when it ends, however it ends."""
    global _depth, _seen
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        left = _pending.pop() if _pending else None
        if _depth == 0:
            _pending.clear()
            _seen = False
    if left is not None:
        raise _exception(left)


def check() -> None:
    """Raise the signal recorded inside :func:`deferred`, if there is one."""
    if _pending:
        raise _exception(_pending.pop())


def exit_process(code: int, *, note: bool = True) -> None:
    """Exit with ``code`` without waiting for threads a model file left running.

    Python waits for every non-daemon thread before it exits, so a model file that starts one (a prefetcher, a
    logger) kept the command, or a ``--workers`` process and the parent waiting for it, alive after its work was
    done. precondtune's own threads are finished by the time this is called. ``note``: say so on stderr.
    """
    left = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if not left:
        sys.exit(code)
    if note:
        names = ", ".join(repr(t.name) for t in left)
        print(f"note: not waiting for {len(left)} thread(s) the model file left running ({names})", file=sys.stderr)
    atexit._run_exitfuncs()  # what a normal exit runs after the threads: database connections close cleanly
    _flush_open_files()
    os._exit(code)


def _flush_open_files() -> None:
    """Flush every open Python file (the model file's own logs included), as interpreter shutdown would: the
    process then ends with ``os._exit``, which drops their buffers. An exact type test, not ``isinstance``, which
    would consult ABC hooks and module proxies among the many objects a torch process holds (≈ 0.2 s here)."""
    import gc
    import io

    writers = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)
    for obj in [sys.stdout, sys.stderr, *(o for o in gc.get_objects() if type(o) in writers)]:
        try:
            if not obj.closed:
                obj.flush()
        except (OSError, ValueError):  # a closed stdout, a file on a vanished disk
            pass
