"""The shared arithmetic of how messages cut the concatenated spans."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Message:
    """One data message: ``spans[i]`` covers ``[offsets[i], offsets[i] + sizes[i])`` of span ``span_ids[i]``."""

    nbytes: int
    span_ids: list[int]
    offsets: list[int]
    sizes: list[int]

    @property
    def direct(self) -> bool:
        """Whether the message is one piece of one span (no staging needed)."""
        return len(self.span_ids) == 1


def cut(span_sizes: list[int], message_sizes: list[int]) -> list[Message]:
    """Maps each message to the span pieces it carries (both sides run this)."""
    out: list[Message] = []
    s, off = 0, 0
    for n in message_sizes:
        ids: list[int] = []
        offs: list[int] = []
        sizes: list[int] = []
        left = n
        while left:
            while span_sizes[s] == off:
                s, off = s + 1, 0
            take = min(left, span_sizes[s] - off)
            ids.append(s)
            offs.append(off)
            sizes.append(take)
            off += take
            left -= take
        out.append(Message(n, ids, offs, sizes))
    return out


class Staging:
    """At most two bucket-sized buffers on one device, reused as they come back."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self._nbytes = nbytes
        self._device = device
        self._free: list[torch.Tensor] = []
        self._made = 0

    def can_take(self) -> bool:
        """Whether :meth:`take` can hand out a buffer without exceeding two."""
        return bool(self._free) or self._made < 2

    def take(self) -> torch.Tensor:
        """A whole buffer; slice it to the message's size."""
        if self._free:
            return self._free.pop()
        self._made += 1
        return torch.empty(self._nbytes, dtype=torch.uint8, device=self._device)

    def give(self, buf: torch.Tensor) -> None:
        """Returns a buffer :meth:`take` handed out."""
        self._free.append(buf)
