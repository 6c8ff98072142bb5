"""One way to express time: deadlines, retry backoff, and knobs read from the environment.

Every public edge takes a ``timeout: timedelta``. Inside, an operation turns
it into one :class:`Deadline` when it starts, and every wait it makes takes
what is left of that deadline, so nested waits never add up to more than the
caller allowed. Retries pause by one :class:`Backoff` policy (50 ms, doubling,
at most 2 s). Knobs read from ``RECOVERYD_*`` variables go through the
``env_*`` helpers here, whose :class:`~recoveryd.errors.ConfigError` names the
variable and the value; an unset or empty variable means the default.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

from recoveryd.errors import ConfigError

_T = TypeVar("_T")
_S = TypeVar("_S", bound=str)

BACKOFF_INITIAL = timedelta(milliseconds=50)
"""The first pause of a :class:`Backoff`."""
BACKOFF_MAX = timedelta(seconds=2)
"""The longest pause of a :class:`Backoff`. Agents retry the coordinator at
least this often, and the coordinator's warm-up counts on it."""


MIN_WAIT = timedelta(milliseconds=1)
"""The shortest timeout handed to a backend or a peer: some read 0 as "wait forever"."""


class Deadline:
    """A point on the monotonic clock, ``timeout`` from when it was made.

    Args:
        timeout: how long from now.
        clock: seconds on a monotonic clock (injectable for tests).
    """

    __slots__ = ("_clock", "_end", "timeout")

    def __init__(self, timeout: timedelta, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        """The whole time this deadline allowed (for messages)."""
        self._clock = clock
        self._end = clock() + timeout.total_seconds()

    def remaining(self) -> timedelta:
        """Time left, never negative."""
        return timedelta(seconds=self.remaining_s())

    def remaining_s(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._end - self._clock())

    @property
    def expired(self) -> bool:
        """Whether no time is left."""
        return self._clock() >= self._end

    def cap(self, limit: timedelta) -> timedelta:
        """``limit``, or the time left if that is shorter."""
        return min(limit, self.remaining())

    def sleep(self, delay: timedelta) -> None:
        """Sleeps ``delay``, or until the deadline if that comes first."""
        time.sleep(min(delay.total_seconds(), self.remaining_s()))

    def wait(self, event: threading.Event, limit: timedelta | None = None) -> bool:
        """Waits for ``event`` until the deadline (or ``limit``, if sooner); returns whether it is set."""
        left = self.remaining() if limit is None else self.cap(limit)
        return event.wait(left.total_seconds())


class Backoff:
    """Exponential backoff between retries: ``initial``, then doubling, at most ``maximum``.

    Args:
        initial: the first pause (50 ms).
        maximum: the longest pause (:data:`BACKOFF_MAX`, 2 s).
    """

    __slots__ = ("_delay", "initial", "maximum")

    def __init__(
        self, initial: timedelta = BACKOFF_INITIAL, maximum: timedelta = BACKOFF_MAX
    ) -> None:
        if initial <= timedelta(0) or maximum < initial:
            raise ConfigError("backoff", (initial, maximum), "needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self._delay = initial

    def next(self) -> timedelta:
        """The pause before the next retry (each call doubles the one after, up to the maximum)."""
        delay = self._delay
        self._delay = min(2 * delay, self.maximum)
        return delay

    def reset(self) -> None:
        """Starts over from ``initial`` (after a success)."""
        self._delay = self.initial


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def env_str(name: str, default: str = "") -> str:
    """The variable's value, or ``default`` when unset or empty."""
    return _raw(name) or default


def env_int(name: str, default: _T, *, what: str = "an integer") -> int | _T:
    """The variable as an integer, or ``default`` when unset or empty.

    Raises:
        ConfigError: the value is not an integer (the message says it must be ``what``).
    """
    raw = _raw(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(name, raw, f"must be {what}") from None


def env_seconds(name: str, default: timedelta) -> timedelta:
    """The variable as a number of seconds, or ``default`` when unset or empty.

    Raises:
        ConfigError: the value is not a number.
    """
    raw = _raw(name)
    if raw is None:
        return default
    try:
        return timedelta(seconds=float(raw))
    except (ValueError, OverflowError):
        raise ConfigError(name, raw, "must be a number of seconds") from None


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_bool(name: str, default: bool) -> bool:
    """The variable as a flag (1/0, true/false, yes/no, on/off), or ``default`` when unset or empty.

    Raises:
        ConfigError: any other value.
    """
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(name, raw, "must be one of 1/0, true/false, yes/no, on/off")


def env_choice(name: str, default: _S, choices: Sequence[_S]) -> _S:
    """The variable as one of ``choices``, or ``default`` when unset or empty.

    Raises:
        ConfigError: any other value.
    """
    raw = _raw(name)
    if raw is None:
        return default
    for c in choices:
        if raw == c:
            return c
    raise ConfigError(name, raw, f"must be one of {', '.join(map(repr, choices))}")
