"""Real faults during a transfer: killed, silent and corrupting peers, hostile bytes.

Ranks are real processes here, so a kill is a real SIGKILL.
"""

from __future__ import annotations

import os
import pickle
import time
from datetime import timedelta

import pytest
import torch

from recoveryd.errors import (
    IntegrityError,
    ManifestError,
    PeerLostError,
    TransferError,
    TransferTimeoutError,
)
from recoveryd.testing import FaultyGroup, run_ranks
from recoveryd.transport import TransferConfig, recv_state_dict, send_state_dict
from recoveryd.transport import format as w
from recoveryd.v1 import manifest_pb2 as pb

pytestmark = pytest.mark.integration

_CFG = TransferConfig(bucket_bytes=1 << 20, checksums=True)


def _state() -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.full((1 << 18,), float(i)) for i in range(16)}  # 16 MiB


def _zeros() -> dict[str, torch.Tensor]:
    """A receiver's own state of the same layout."""
    return {k: torch.zeros_like(v) for k, v in _state().items()}


def _killed_sender(rank: int, ws: int, pg: object, store: object, timeout_s: float) -> object:
    if rank == 0:
        send_state_dict(
            FaultyGroup(pg, after=3, mode="kill"),
            [1],
            _state(),
            timeout=timedelta(seconds=30),
            config=_CFG,
        )  # type: ignore[arg-type]
        raise AssertionError("should have been killed")
    mine = _zeros()
    start = time.monotonic()
    with pytest.raises((PeerLostError, TransferTimeoutError)) as e:
        recv_state_dict(pg, 0, into=mine, timeout=timedelta(seconds=timeout_s), config=_CFG)  # type: ignore[arg-type]
    return type(e.value).__name__, time.monotonic() - start


def test_sender_killed_mid_transfer_fails_the_receiver_fast() -> None:
    _, (kind, took) = run_ranks(_killed_sender, 2, args=(20.0,), allow_death=[0])
    assert kind == "PeerLostError", kind
    assert took < 20.0 + 2.0


def _killed_receiver(rank: int, ws: int, pg: object, store: object) -> object:
    if rank == 1:
        faulty = FaultyGroup(pg, after=3, mode="kill_on_recv")  # type: ignore[arg-type]
        recv_state_dict(faulty, 0, timeout=timedelta(seconds=30), config=_CFG)  # type: ignore[arg-type]
        raise AssertionError("should have been killed")
    start = time.monotonic()
    with pytest.raises((PeerLostError, TransferTimeoutError)) as e:
        send_state_dict(pg, [1], _state(), timeout=timedelta(seconds=20), config=_CFG)  # type: ignore[arg-type]
    return type(e.value).__name__, time.monotonic() - start


def test_receiver_killed_mid_transfer_fails_the_sender() -> None:
    (kind, took), _ = run_ranks(_killed_receiver, 2, allow_death=[1])
    assert kind == "PeerLostError", kind
    assert took < 22.0


def _silent_sender(rank: int, ws: int, pg: object, store: object) -> object:
    if rank == 0:
        try:
            send_state_dict(
                FaultyGroup(pg, after=2, mode="silence"),
                [1],
                _state(),
                timeout=timedelta(seconds=6),
                config=_CFG,
            )  # type: ignore[arg-type]
        except TransferError:
            pass
        time.sleep(1)
        return None
    mine = _zeros()
    start = time.monotonic()
    with pytest.raises(TransferTimeoutError):
        recv_state_dict(pg, 0, into=mine, timeout=timedelta(seconds=2), config=_CFG)  # type: ignore[arg-type]
    return time.monotonic() - start


def test_peer_silent_mid_stream_times_out_within_deadline() -> None:
    _, took = run_ranks(_silent_sender, 2)
    assert 1.9 < took < 3.5, took


def _corrupt(rank: int, ws: int, pg: object, store: object) -> object:
    if rank == 0:
        with pytest.raises(TransferError, match="broken"):
            send_state_dict(
                FaultyGroup(pg, after=5, mode="corrupt"),
                [1],
                _state(),
                timeout=timedelta(seconds=30),
                config=_CFG,
            )  # type: ignore[arg-type]
        return None
    with pytest.raises(IntegrityError, match="checksum") as e:
        recv_state_dict(pg, 0, timeout=timedelta(seconds=30), config=_CFG)  # type: ignore[arg-type]
    return str(e.value)


def test_corrupted_bucket_is_detected_on_both_sides() -> None:
    _, text = run_ranks(_corrupt, 2)
    assert "message 5" in text


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/recoveryd-pwned",))


def _hostile(rank: int, ws: int, pg: object, store: object, body: bytes) -> object:
    if rank == 0:
        t = torch.frombuffer(bytearray(body), dtype=torch.uint8)
        pg.send([torch.tensor([w.MAGIC, w.FORMAT_VERSION, len(body), 0])], 1, w.TAG_HEADER).wait()  # type: ignore[attr-defined]
        pg.send([t], 1, w.TAG_MANIFEST).wait()  # type: ignore[attr-defined]
        ack = torch.zeros(2, dtype=torch.int64)
        pg.recv([ack], 1, w.TAG_ACK).wait()  # type: ignore[attr-defined]
        return int(ack[0])
    with pytest.raises(ManifestError) as e:
        recv_state_dict(pg, 0, timeout=timedelta(seconds=10))  # type: ignore[arg-type]
    return str(e.value)


def _bad_manifests() -> dict[str, bytes]:
    out_of_range = pb.Manifest(format_version=w.FORMAT_VERSION, chain=[0, 1])
    out_of_range.node_kind.append(pb.NODE_KIND_TENSOR)
    out_of_range.node_arg.append(0)
    out_of_range.tensor_dtype.append(pb.DTYPE_FLOAT32)
    out_of_range.tensor_ndim.append(1)
    out_of_range.tensor_shape.append(1 << 40)
    out_of_range.tensor_stride.append(1)
    out_of_range.tensor_storage.append(0)
    out_of_range.tensor_byte_offset.append(0)
    out_of_range.tensor_requires_grad.append(False)
    out_of_range.storage_nbytes.append(16)
    out_of_range.message_nbytes.append(16)
    deep = pb.Manifest(format_version=w.FORMAT_VERSION, chain=[0, 1])
    deep.node_kind.extend([pb.NODE_KIND_LIST] * 5000)
    deep.node_arg.extend([1] * 5000)
    return {
        "pickle": pickle.dumps(_Evil()),
        "garbage": os.urandom(4096),
        "out_of_range": out_of_range.SerializeToString(),
        "deep": deep.SerializeToString(),
    }


@pytest.mark.parametrize("kind", sorted(_bad_manifests()))
def test_hostile_manifest_is_rejected_and_runs_no_code(kind: str) -> None:
    if os.path.exists("/tmp/recoveryd-pwned"):
        os.remove("/tmp/recoveryd-pwned")
    ack, text = run_ranks(_hostile, 2, args=(_bad_manifests()[kind],))
    assert ack == w.ACK_BAD_MANIFEST, (ack, text)
    assert not os.path.exists("/tmp/recoveryd-pwned")
