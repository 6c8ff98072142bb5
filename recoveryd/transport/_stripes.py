"""Stripes: disjoint runs of a transfer's data messages, one per donor of a striped receive.

Donors of the same layout at the same step cut their state into the same
messages (the manifest lists them), so a joiner can ask each donor for a
different run of them. The joiner decides the runs: it asks each donor for
``[lo, hi)`` in its answer to the offer, the donor echoes the run in its go,
and only those messages travel on that donor's wire. A run is sized by the
donors' shares (a slow donor gets a smaller one).
"""

from __future__ import annotations

from collections.abc import Sequence

from recoveryd.errors import ConfigError

WHOLE = 0
"""The stripe word of an unstriped transfer: every message."""
_BITS = 32
_MAX = (1 << 31) - 1


def encode(lo: int, hi: int) -> int:
    """The stripe word asking for messages ``[lo, hi)`` (``hi`` >= 1; an empty run is not asked)."""
    if not 0 <= lo < hi <= _MAX:
        raise ConfigError("stripe", (lo, hi), f"must satisfy 0 <= lo < hi <= {_MAX}")
    return (lo << _BITS) | hi


def decode(word: int, messages: int) -> range:
    """The messages a stripe word asks for, out of ``messages``.

    Raises:
        ValueError: the word does not name a run inside ``[0, messages)`` (a
            hostile or confused peer).
    """
    if word == WHOLE:
        return range(messages)
    if word < 0:
        raise ValueError(f"stripe word {word} is negative")
    lo, hi = word >> _BITS, word & ((1 << _BITS) - 1)
    if not 0 <= lo < hi <= messages:
        raise ValueError(f"stripe [{lo}, {hi}) is not a run of the {messages} messages")
    return range(lo, hi)


def split(message_nbytes: Sequence[int], shares: Sequence[float]) -> list[range]:
    """Cuts the messages into one contiguous run per share, bytes in proportion to the shares.

    Every message is in exactly one run, in order; a run may be empty when
    there are fewer messages than shares or a share is tiny.

    Raises:
        ConfigError: no shares, or a share that is not a positive finite number.
    """
    if not shares or any(not (s > 0 and s < float("inf")) for s in shares):
        raise ConfigError("shares", list(shares), "must be positive finite numbers")
    total = sum(message_nbytes)
    whole = sum(shares)
    runs: list[range] = []
    lo, acc, target = 0, 0, 0.0
    for k, share in enumerate(shares):
        target += total * share / whole
        hi = lo
        if k == len(shares) - 1:
            hi = len(message_nbytes)
        else:
            # Take messages while the run's end is nearer the target with them than without.
            while hi < len(message_nbytes) and acc + message_nbytes[hi] / 2 <= target:
                acc += message_nbytes[hi]
                hi += 1
        runs.append(range(lo, hi))
        lo = hi
    return runs
