"""Stripes: runs of messages that cover a transfer once, sized by shares; hostile words refused."""

from __future__ import annotations

import pytest

from recoveryd.errors import ConfigError
from recoveryd.transport import _stripes as stripes


@pytest.mark.parametrize(
    ("sizes", "shares"),
    [
        ([10] * 30, [1, 1, 1]),
        ([100, 1, 1, 1, 100, 5] * 7, [2, 1]),
        ([7] * 5, [1] * 8),
        ([1 << 24] * 3 + [4096] * 100, [1, 1]),
    ],
)
def test_runs_cover_every_message_once_in_order(sizes: list[int], shares: list[float]) -> None:
    runs = stripes.split(sizes, shares)
    assert len(runs) == len(shares)
    assert [i for r in runs for i in r] == list(range(len(sizes)))


def test_bytes_follow_the_shares() -> None:
    sizes = [1000] * 300
    runs = stripes.split(sizes, [3, 1])
    got = [sum(sizes[i] for i in r) for r in runs]
    assert got == [225_000, 75_000]
    even = [sum(sizes[i] for i in r) for r in stripes.split(sizes, [1, 1, 1])]
    assert even == [100_000] * 3


def test_words_round_trip_and_hostile_ones_are_refused() -> None:
    assert stripes.decode(stripes.encode(3, 9), 10) == range(3, 9)
    assert stripes.decode(stripes.WHOLE, 10) == range(10)
    for word in (stripes.encode(3, 11), -1, (5 << 32) | 5, (9 << 32) | 2):
        with pytest.raises(ValueError, match="stripe"):
            stripes.decode(word, 10)
    for lo, hi in ((4, 4), (-1, 2), (0, 1 << 31)):
        with pytest.raises(ConfigError):
            stripes.encode(lo, hi)
    for bad in ([], [1, 0], [1, float("inf")], [float("nan")]):
        with pytest.raises(ConfigError):
            stripes.split([1, 2], bad)
