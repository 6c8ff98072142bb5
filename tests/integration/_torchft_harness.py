"""Run test ranks as real processes: spawn, watch exit codes, kill, and always clean up.

Each child runs a module-level function in a fresh ``spawn`` interpreter with its
stdout and stderr sent to its own log file. A watchdog thread in the child ends it
when the test process goes away or its lifetime runs out, so even a test killed by
pytest-timeout leaves no rank behind. The parent polls exit codes while it waits,
so a crashed rank fails the test at once, with its log tail, instead of hanging it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "AbortCheck",
    "Child",
    "ChildFailedError",
    "Children",
    "Deadline",
    "WaitAbortedError",
    "WaitTimeoutError",
]

AbortCheck = Callable[[], str | None]
"""Polled during a wait: returns why to give up now, or ``None`` to keep waiting."""

_POLL_S = 0.05
_LOG_TAIL_BYTES = 8000
# A child whose parent died, or that outlived its lifetime, exits with this code.
_ORPHAN_EXIT_CODE = 97


@dataclass(frozen=True, slots=True)
class Deadline:
    """A point in time (``time.monotonic``) that every wait of one scenario counts down to."""

    at: float

    @classmethod
    def after(cls, timeout: timedelta) -> Deadline:
        return cls(time.monotonic() + timeout.total_seconds())

    def remaining(self) -> timedelta:
        return timedelta(seconds=max(0.0, self.at - time.monotonic()))

    def clamp(self, timeout: timedelta) -> timedelta:
        """The smaller of ``timeout`` and the time left."""
        return min(timeout, self.remaining())


@dataclass(eq=False, slots=True)
class Child:
    """One spawned process and the file its output goes to."""

    name: str
    process: BaseProcess
    log_path: Path

    @property
    def pid(self) -> int:
        pid = self.process.pid
        assert pid is not None, f"{self.name} was never started"
        return pid

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "<no log>"
        return data[-max_bytes:].decode("utf-8", errors="replace")


def _describe(children: Iterable[Child]) -> str:
    return "\n".join(
        f"----- {c.name} (pid={c.process.pid} exitcode={c.exitcode}) {c.log_path} -----\n"
        f"{c.log_tail()}"
        for c in children
    )


class ChildFailedError(AssertionError):
    """A child exited when it should not have, or with a non-zero code.

    Attributes:
        name: the child's name.
        exitcode: its exit code (negative: killed by that signal).
    """

    def __init__(self, child: Child, why: str, others: Sequence[Child] = ()) -> None:
        super().__init__(
            f"{child.name} (pid={child.process.pid}) {why}, exitcode={child.exitcode}; "
            f"its log and the others' follow\n{_describe([child, *others])}"
        )
        self.name = child.name
        self.exitcode = child.exitcode


class WaitAbortedError(AssertionError):
    """A wait's ``abort_if`` check reported a failure before the wait was over.

    Attributes:
        what: what was being waited for.
        reason: what ``abort_if`` reported.
    """

    def __init__(self, what: str, reason: str, children: Sequence[Child]) -> None:
        super().__init__(
            f"gave up waiting for {what}: {reason}; logs follow\n{_describe(children)}"
        )
        self.what = what
        self.reason = reason


class WaitTimeoutError(AssertionError, TimeoutError):
    """A wait ran out of time.

    Attributes:
        what: what was being waited for.
        timeout: how long it waited.
    """

    def __init__(self, what: str, timeout: timedelta, children: Sequence[Child]) -> None:
        super().__init__(
            f"timed out after {timeout.total_seconds():.1f}s waiting for {what}; "
            f"logs follow\n{_describe(children)}"
        )
        self.what = what
        self.timeout = timeout


def _check_abort(what: str, abort_if: AbortCheck | None, children: Sequence[Child]) -> None:
    if abort_if is not None and (reason := abort_if()) is not None:
        raise WaitAbortedError(what, reason, children)


def _watchdog(parent_pid: int, lifetime_s: float) -> None:
    deadline = time.monotonic() + lifetime_s
    while True:
        if os.getppid() != parent_pid:
            print(f"watchdog: parent {parent_pid} is gone, exiting", flush=True)
            os._exit(_ORPHAN_EXIT_CODE)
        if time.monotonic() > deadline:
            print(f"watchdog: lifetime of {lifetime_s:.0f}s ran out, exiting", flush=True)
            os._exit(_ORPHAN_EXIT_CODE)
        time.sleep(0.2)


def _child_entry(
    target: Callable[..., object],
    args: tuple[Any, ...],
    log_path: str,
    parent_pid: int,
    lifetime_s: float,
) -> None:
    """Runs in the child: send output to the log, start the watchdog, call ``target``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    threading.Thread(
        target=_watchdog, args=(parent_pid, lifetime_s), name="watchdog", daemon=True
    ).start()
    target(*args)


class Children:
    """The processes of one test; a context manager that kills whatever is left on exit.

    Args:
        log_dir: where each child's ``<name>.log`` goes.
        lifetime: after this long a child ends itself even if nobody kills it.
    """

    def __init__(self, log_dir: Path, *, lifetime: timedelta) -> None:
        self._log_dir = log_dir
        self._lifetime = lifetime
        self._ctx = multiprocessing.get_context("spawn")
        self._children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def all(self) -> list[Child]:
        return list(self._children)

    def spawn(self, name: str, target: Callable[..., object], *args: Any) -> Child:
        """Start ``target(*args)`` in a fresh interpreter; ``target`` must be importable."""
        log_path = self._log_dir / f"{name}.log"
        process = self._ctx.Process(
            target=_child_entry,
            args=(target, args, str(log_path), os.getpid(), self._lifetime.total_seconds()),
            name=name,
            daemon=False,
        )
        child = Child(name=name, process=process, log_path=log_path)
        self._children.append(child)
        process.start()
        return child

    def kill(self, child: Child, *, timeout: timedelta = timedelta(seconds=10)) -> None:
        """SIGKILL ``child`` and reap it."""
        if child.process.is_alive():
            os.kill(child.pid, signal.SIGKILL)
        child.process.join(timeout.total_seconds())
        if child.process.is_alive():
            raise WaitTimeoutError(f"{child.name} to die after SIGKILL", timeout, [child])

    def wait_for(
        self,
        what: str,
        predicate: Callable[[], bool],
        *,
        timeout: timedelta,
        watch: Sequence[Child],
        abort_if: AbortCheck | None = None,
    ) -> None:
        """Poll ``predicate`` until true; fail at once if a watched child exits first.

        Raises:
            ChildFailedError: a watched child exited before ``predicate`` held.
            WaitAbortedError: ``abort_if`` returned a reason.
            WaitTimeoutError: ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            if predicate():
                return
            _check_abort(what, abort_if, watch)
            for child in watch:
                if child.exitcode is not None:
                    others = [c for c in watch if c is not child]
                    raise ChildFailedError(child, f"exited while waiting for {what}", others)
            if time.monotonic() > deadline:
                raise WaitTimeoutError(what, timeout, watch)
            time.sleep(_POLL_S)

    def wait_exit_ok(
        self,
        children: Sequence[Child],
        *,
        timeout: timedelta,
        abort_if: AbortCheck | None = None,
    ) -> None:
        """Wait until every child in ``children`` exits 0; the first other exit code fails.

        Raises:
            ChildFailedError: a child exited with a non-zero code.
            WaitAbortedError: ``abort_if`` returned a reason.
            WaitTimeoutError: ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout.total_seconds()
        pending = list(children)
        what = "{} to exit".format(", ".join(c.name for c in children))
        while pending:
            _check_abort(what, abort_if, children)
            for child in list(pending):
                code = child.exitcode
                if code is None:
                    continue
                if code != 0:
                    others = [c for c in children if c is not child]
                    raise ChildFailedError(child, "failed", others)
                child.process.join()
                pending.remove(child)
            if pending and time.monotonic() > deadline:
                raise WaitTimeoutError(what, timeout, children)
            time.sleep(_POLL_S)

    def close(self) -> None:
        """SIGKILL every child still running and reap them all."""
        for child in self._children:
            if child.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
        for child in self._children:
            child.process.join(10.0)
        leftover = [c.name for c in self._children if c.process.is_alive()]
        if leftover:
            raise RuntimeError(f"children still alive after SIGKILL: {leftover}")
