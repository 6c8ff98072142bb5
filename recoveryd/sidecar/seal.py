"""Shared memory a trainer cannot pull from under its sidecar: sealed memfds, and the checks on them.

The sidecar maps the trainer's CPU storages and reads and writes them (sends
and recoveries). A file that shrinks under a mapping turns the next access
past its new end into ``SIGBUS``, which kills the whole sidecar, and with it
every rank attached to it. torch's own ``share_memory_()`` (this is torch
2.13's ``file_descriptor`` strategy) puts a storage in a ``/dev/shm`` file
made by ``shm_open``, which cannot be sealed: the kernel creates it with
``F_SEAL_SEAL`` already set, so ``F_ADD_SEALS`` fails with ``EPERM``.

So the trainer's side (:func:`move_to_sealed_memory`) does what
``share_memory_()`` does, with a memfd instead: a new segment of the
storage's size, sealed against shrinking and growing (``F_SEAL_SHRINK |
F_SEAL_GROW | F_SEAL_SEAL``), mapped by torch (``_new_shared_fd_cpu``), the
bytes copied in, and the storage's data pointer swapped in place
(``_swap_data_ptr_``, which is how ``share_memory_()`` keeps the storage's
identity too), so every view of it follows. A memfd lives in the kernel's
internal shared memory, not in ``/dev/shm``: its size counts against the
trainer's memory limit, not against the size of ``/dev/shm``.

The sidecar's side (:func:`check_segment`) takes a descriptor only if it is a
regular file at least as large as its handle says (so mapping it never grows
the trainer's file), and, unless configured otherwise, only if it is sealed
against shrinking. An unsealed segment accepted anyway (``require_sealed``
off, for a trainer whose torch cannot seal) is checked again before every
request that touches it (:func:`shrunk`); that narrows the window, it does
not close it: a trainer that shrinks the file during a send still crashes
the sidecar.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

import torch

from recoveryd.errors import ConfigError, ManifestError

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""The seals a trainer's segment gets: its size is fixed, and no one may add more."""
DEV_SHM = "/dev/shm"


def can_seal() -> bool:
    """Whether this process can move storages into sealed memfds (Linux, and a torch that swaps
    a storage's memory in place)."""
    return hasattr(os, "memfd_create") and hasattr(torch.UntypedStorage, "_swap_data_ptr_")


def move_to_sealed_memory(storage: torch.UntypedStorage) -> None:
    """Moves a CPU storage's bytes into a new sealed memfd, in place (its views follow).

    Raises:
        OSError: the segment could not be made (no memory for it).
    """
    n = storage.nbytes()
    fd = os.memfd_create("recoveryd", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        # Allocated now rather than at the first touch: a trainer without the
        # memory fails here with ENOMEM/ENOSPC, not later at a random page.
        os.posix_fallocate(fd, 0, n)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        shared = torch.UntypedStorage._new_shared_fd_cpu(fd, n)  # type: ignore[attr-defined]
    finally:
        os.close(fd)  # torch keeps a duplicate for as long as the storage lives
    shared.copy_(storage)
    storage._swap_data_ptr_(shared)  # type: ignore[attr-defined]


def seals(fd: int) -> int:
    """The seals of ``fd`` (0 for a file that cannot carry any)."""
    try:
        return int(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
    except OSError as err:
        if err.errno == errno.EINVAL:  # not shmem/hugetlbfs: no seals at all
            return 0
        raise


def check_segment(fd: int, size: int, storage_id: int, *, require_sealed: bool) -> bool:
    """Checks a trainer's descriptor before the sidecar maps ``size`` bytes of it.

    Returns:
        Whether it is sealed against shrinking (an unsealed one must be
        checked again with :func:`shrunk` before every use).

    Raises:
        ManifestError: not a regular file, smaller than ``size``, or (with
            ``require_sealed``) not sealed against shrinking, or, unsealed,
            not a file of this host's ``/dev/shm``.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(
            f"storage {storage_id}: its descriptor is {_kind(st.st_mode)}, not shared memory: "
            "refused (a trainer shares its storages as memfd or /dev/shm files)"
        )
    if size <= 0 or size > st.st_size:
        raise ManifestError(
            f"storage {storage_id}: its handle says {size} bytes but the file holds "
            f"{st.st_size}: refused (the sidecar maps a trainer's file as it is, never "
            "growing it); the trainer described memory it did not share"
        )
    if seals(fd) & fcntl.F_SEAL_SHRINK:
        return True
    if require_sealed:
        raise ManifestError(
            f"storage {storage_id}: its memory is not sealed against shrinking "
            "(F_SEAL_SHRINK), so the trainer could crash this sidecar (SIGBUS) for every rank "
            "it serves: refused. recoveryd.attach seals what it shares (on Linux, with a torch "
            "that has UntypedStorage._swap_data_ptr_, as 2.13 has); a storage already shared "
            "before attach (e.g. model.share_memory()) is not: let attach share it, or accept "
            "unsealed memory on this sidecar "
            "(require_sealed=False / RECOVERYD_SIDECAR_REQUIRE_SEALED=0)"
        )
    try:
        shm_dev = os.stat(DEV_SHM).st_dev
    except OSError:
        shm_dev = -1
    if st.st_dev != shm_dev:
        raise ManifestError(
            f"storage {storage_id}: its unsealed file is not in this host's {DEV_SHM}: refused "
            "(only sealed memfds or /dev/shm segments are mapped)"
        )
    return False


def shrunk(fd: int, size: int) -> int | None:
    """The size of ``fd``'s file if it is now smaller than ``size`` (``None``: still whole)."""
    try:
        now = os.fstat(fd).st_size
    except OSError:
        return 0
    return now if now < size else None


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def memory_error(err: OSError, total_bytes: int) -> ConfigError:
    """The error of a trainer whose state did not fit in (sealed) shared memory."""
    return ConfigError(
        "shared memory",
        f"{total_bytes} bytes of CPU state",
        f"could not move the state into sealed shared memory ({err}): the trainer's memory "
        "limit must hold the whole CPU state once (it is shared with the sidecar, not copied); "
        "raise the trainer container's memory limit",
    )
