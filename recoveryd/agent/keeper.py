"""Keeps a rank's secret on local disk, so a restarted trainer takes its own rank back at once.

The coordinator hands each registration a secret and replaces a *live*
registration only for a caller that presents it (:mod:`recoveryd.coordinator.membership`).
A trainer killed and restarted in place (a crash, a container restart) has
lost it with its memory; without it, its new agent would wait until the old
registration falls silent (``heartbeat_timeout``) before it could register.
So the agent writes the secret to a private file and reads it back on start.

The file lives in :attr:`AgentConfig.state_dir` (``RECOVERYD_STATE_DIR``;
default ``$TMPDIR/recoveryd-<uid>``), a directory only this user may enter
(mode 0700, checked: one that others can read or that another user owns is
not used, and the agent falls back to waiting). Its name is a digest of the
coordinator's address and the rank, so nothing from the network becomes a path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile

logger = logging.getLogger(__name__)

MAX_SECRET_CHARS = 256


def default_dir() -> str:
    """``$TMPDIR/recoveryd-<uid>`` (``/tmp/recoveryd-<uid>`` on most machines)."""
    return os.path.join(tempfile.gettempdir(), f"recoveryd-{os.getuid()}")


class SecretKeeper:
    """One rank's secret file.

    Args:
        directory: where the file lives ("" disables keeping: nothing is written).
        coordinator: the coordinator's address (a secret is only good there).
        replica_id: the rank's replica.
        group_rank: the rank.
    """

    def __init__(self, directory: str, coordinator: str, replica_id: str, group_rank: int) -> None:
        self._dir = directory
        name = hashlib.sha256(f"{coordinator}\0{replica_id}\0{group_rank}".encode()).hexdigest()
        self.path = os.path.join(directory, f"rank-{name[:32]}.secret") if directory else ""

    def _private_dir(self) -> bool:
        """Creates the directory (0700) if missing; whether it is this user's alone."""
        try:
            os.makedirs(self._dir, mode=0o700, exist_ok=True)
            st = os.stat(self._dir, follow_symlinks=False)
        except OSError as err:
            logger.warning("cannot keep the rank's secret in %s: %s", self._dir, err)
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            logger.warning(
                "not keeping the rank's secret in %s: it must be a directory of uid %d with "
                "mode 0700 (it is uid %d, mode %o); a restarted trainer then waits for its old "
                "registration to fall silent",
                self._dir,
                os.getuid(),
                st.st_uid,
                stat.S_IMODE(st.st_mode),
            )
            return False
        return True

    def load(self) -> str:
        """The secret kept by an earlier agent of this rank ("" if none)."""
        if not self.path or not self._private_dir():
            return ""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return ""
        except OSError as err:
            logger.warning("cannot read the rank's secret %s: %s", self.path, err)
            return ""
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_SECRET_CHARS + 1)
        secret = raw.decode("ascii", "replace").strip()
        return secret if 0 < len(secret) <= MAX_SECRET_CHARS and secret.isprintable() else ""

    def store(self, secret: str) -> None:
        """Keeps ``secret`` (written whole or not at all, mode 0600)."""
        if not self.path or not secret or not self._private_dir():
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secret.encode("ascii"))
            os.replace(tmp, self.path)
        except OSError as err:
            logger.warning("cannot keep the rank's secret in %s: %s", self.path, err)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def forget(self) -> None:
        """Removes the file (the rank left the job on purpose)."""
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
