"""One way to wait: Deadline, Backoff and the environment helpers."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from recoveryd._time import (
    BACKOFF_MAX,
    Backoff,
    Deadline,
    env_bool,
    env_choice,
    env_int,
    env_seconds,
    env_str,
)
from recoveryd.errors import ConfigError


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_deadline_counts_down_and_never_goes_negative() -> None:
    clock = _Clock()
    d = Deadline(timedelta(seconds=10), clock=clock)
    assert d.remaining() == timedelta(seconds=10)
    assert not d.expired
    clock.now += 4
    assert d.remaining_s() == pytest.approx(6)
    assert d.cap(timedelta(seconds=2)) == timedelta(seconds=2)
    assert d.cap(timedelta(seconds=60)) == timedelta(seconds=6)
    clock.now += 7
    assert d.expired
    assert d.remaining() == timedelta(0)
    assert d.timeout == timedelta(seconds=10)


def test_a_deadline_bounds_its_sleeps_and_waits() -> None:
    d = Deadline(timedelta(seconds=0.2))
    t0 = time.monotonic()
    d.sleep(timedelta(seconds=5))  # cut to what is left
    assert 0.15 < time.monotonic() - t0 < 1.0
    assert d.expired
    never = threading.Event()
    t0 = time.monotonic()
    assert not Deadline(timedelta(seconds=0.1)).wait(never)
    assert time.monotonic() - t0 < 1.0
    set_ = threading.Event()
    set_.set()
    assert Deadline(timedelta(seconds=5)).wait(set_, timedelta(seconds=1))


def test_backoff_doubles_to_its_cap_and_starts_over() -> None:
    b = Backoff()
    got = [b.next().total_seconds() for _ in range(8)]
    assert got == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert timedelta(seconds=2) == BACKOFF_MAX
    b.reset()
    assert b.next() == timedelta(milliseconds=50)
    with pytest.raises(ConfigError):
        Backoff(timedelta(seconds=1), timedelta(seconds=0.5))


def test_env_helpers_read_defaults_values_and_name_bad_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("RECOVERYD_T_INT", "RECOVERYD_T_BOOL", "RECOVERYD_T_S", "RECOVERYD_T_C"):
        monkeypatch.delenv(name, raising=False)
    assert env_int("RECOVERYD_T_INT", None) is None
    monkeypatch.setenv("RECOVERYD_T_INT", "")  # empty means unset
    assert env_int("RECOVERYD_T_INT", 7) == 7
    monkeypatch.setenv("RECOVERYD_T_INT", "42")
    assert env_int("RECOVERYD_T_INT", 7) == 42
    monkeypatch.setenv("RECOVERYD_T_INT", "4k")
    with pytest.raises(ConfigError, match=r"RECOVERYD_T_INT.*must be a port") as e:
        env_int("RECOVERYD_T_INT", 7, what="a port")
    assert e.value.field == "RECOVERYD_T_INT"
    monkeypatch.setenv("RECOVERYD_T_BOOL", "Yes")
    assert env_bool("RECOVERYD_T_BOOL", False) is True
    monkeypatch.setenv("RECOVERYD_T_BOOL", "maybe")
    with pytest.raises(ConfigError, match="RECOVERYD_T_BOOL"):
        env_bool("RECOVERYD_T_BOOL", False)
    monkeypatch.setenv("RECOVERYD_T_S", "2.5")
    assert env_seconds("RECOVERYD_T_S", timedelta(1)) == timedelta(seconds=2.5)
    monkeypatch.setenv("RECOVERYD_T_S", "soon")
    with pytest.raises(ConfigError, match="seconds"):
        env_seconds("RECOVERYD_T_S", timedelta(1))
    monkeypatch.setenv("RECOVERYD_T_C", "star")
    assert env_choice("RECOVERYD_T_C", "chain", ("chain", "star")) == "star"
    monkeypatch.setenv("RECOVERYD_T_C", "tree")
    with pytest.raises(ConfigError, match="'chain', 'star'"):
        env_choice("RECOVERYD_T_C", "chain", ("chain", "star"))
    assert env_str("RECOVERYD_T_UNSET_AT_ALL", "x") == "x"
