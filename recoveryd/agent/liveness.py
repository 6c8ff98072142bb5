"""Whether a donor still lives, seen through its rendezvous store, for a striped receive.

A donor's agent hosts the store its plans rendezvous on. When the donor
process dies, the kernel resets that store's connections, and the next look
fails at once; Gloo, though, does not always wake a receive whose peer was
SIGKILLed between two messages, and without this probe only the transfer's
``stall_timeout`` would end that wait. A look that gets no answer at all (a
silent link) says nothing either way: the watch stops and the stall bound
decides, as it does for any silent peer.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import torch.distributed as dist

from recoveryd.agent.rendezvous import bounded
from recoveryd.errors import TransferTimeoutError

WATCH_EVERY = timedelta(milliseconds=100)
"""How often the store is looked at (a look is one small round trip)."""
SILENCE = timedelta(seconds=2)
"""A look unanswered this long ends the watch (the store must not be used again)."""


class StoreWatch:
    """Looks at a store every :data:`WATCH_EVERY` in a thread of its own until closed.

    Calling it says whether the store still answered at the last look (it
    answers at once: it is read while a transfer waits).

    Args:
        store: the donor's store (a client connected to it).
        key: a key to look for (its presence does not matter; the answer does).
        name: the donor, for the thread's name and :attr:`why`.
    """

    def __init__(self, store: dist.Store, key: str, name: str) -> None:
        self._store = store
        self._key = key
        self._dead = threading.Event()
        self._stop = threading.Event()
        self.why = ""
        """Why the donor is taken for dead ("" while it is not)."""
        self.silent = False
        """A look got no answer: the store must not be used again (a reply may
        still arrive on it, and its client's lock is held until the kernel gives
        up on the connection)."""
        self._thread = threading.Thread(
            target=self._run, name=f"recoveryd-watch-{name}"[:40], daemon=True
        )
        self._thread.start()

    def __call__(self) -> bool:
        return not self._dead.is_set()

    def close(self) -> None:
        """Stops the watch, waiting for a look under way (at most :data:`SILENCE`)."""
        self._stop.set()
        self._thread.join(SILENCE.total_seconds())

    def _run(self) -> None:
        while not self._stop.wait(WATCH_EVERY.total_seconds()):
            try:
                bounded(lambda: self._store.check([self._key]), SILENCE, "watching a donor")
            except TransferTimeoutError:
                self.silent = True
                return  # silent, not gone: the transfer's stall bound decides
            except RuntimeError as err:
                if any(w in str(err).lower() for w in ("timeout", "timed out")):
                    self.silent = True  # the store's own timeout: silent as well
                    return
                self.why = str(err)  # the connection was reset or closed: it died
                self._dead.set()
                return
