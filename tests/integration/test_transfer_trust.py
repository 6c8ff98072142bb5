"""Only the planned donor writes into a joiner, and only the planned joiner reads a donor.

Real Gloo groups between spawned processes on 127.0.0.1. Each side is given a
plan key (the coordinator hands one to a plan's parties only); a stranger
who joins the plan's group without it, as an attacker who lists the donor's
rendezvous store could, is refused before the manifest, with nothing sent or
written. Tampered manifests and data fail their MACs, and the joiner, not
the donor, decides whether data messages are MAC'd.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from recoveryd.agent.rendezvous import host_store
from recoveryd.errors import ConfigError
from recoveryd.testing.faults import FaultyGroup
from recoveryd.testing.ranks import run_ranks
from recoveryd.transport import TransferConfig, recv_state_dict, send_state_dict
from recoveryd.transport import format as f

pytestmark = pytest.mark.integration

_T = timedelta(seconds=30)
_KEY = bytes(range(32))
_WRONG = bytes(32)
_N = 1 << 16  # 256 KiB of float32: several data messages with small buckets
_SMALL = {"bucket_bytes": 64 << 10, "direct_bytes": 64 << 10}


def _state(fill: float) -> dict[str, Any]:
    return {"w": torch.full((_N,), fill), "lr": 0.1, "step": 7}


class _Tamper:
    """A group that flips one byte of the manifest it sends (a man in the middle)."""

    def __init__(self, pg: dist.ProcessGroup) -> None:
        self._pg = pg

    def rank(self) -> int:
        return self._pg.rank()

    def size(self) -> int:
        return self._pg.size()

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> Any:
        return self._pg.recv(tensors, src, tag)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> Any:
        if tag == f.TAG_MANIFEST:
            bad = tensors[0].clone()
            bad[bad.numel() // 3] ^= 0x01
            return self._pg.send([bad], dst, tag)
        return self._pg.send(tensors, dst, tag)


def _outcome(fn: Any) -> str:
    try:
        fn()
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _pair(rank: int, ws: int, pg: Any, store: dist.Store, case: str) -> object:
    donor_key = _WRONG if case == "stranger_donor" else _KEY
    joiner_key = _WRONG if case == "stranger_joiner" else _KEY
    if rank == 0:
        group: Any = pg
        if case == "tampered_manifest":
            group = _Tamper(pg)
        elif case == "corrupt_data":
            group = FaultyGroup(pg, after=1, mode="corrupt")
        config = TransferConfig(checksums=False, **_SMALL)  # the donor would not check
        return _outcome(
            lambda: send_state_dict(
                group, [1], _state(3.0), timeout=_T, step=5, config=config, auth_key=donor_key
            )
        )
    into = _state(-1.0)
    config = TransferConfig(data_macs=case in ("corrupt_data", "macs"), **_SMALL)
    said = _outcome(
        lambda: recv_state_dict(
            pg, 0, timeout=_T, into=into, step=5, config=config, auth_key=joiner_key
        )
    )
    written = not bool(into["w"].eq(-1.0).all())
    return said, written, bool(into["w"].eq(3.0).all())


def test_the_planned_parties_transfer_with_the_key() -> None:
    donor, (joiner, written, complete) = run_ranks(_pair, 2, args=("ok",), timeout=_T * 2)
    assert donor == "ok"
    assert joiner == "ok"
    assert written
    assert complete


def test_a_stranger_in_the_joiners_place_gets_nothing() -> None:
    donor, (joiner, written, _) = run_ranks(_pair, 2, args=("stranger_joiner",), timeout=_T * 2)
    assert donor.startswith("UntrustedPeerError: rank 1 could not prove"), donor
    assert "nothing was sent" in donor
    assert not joiner.startswith("ok"), joiner
    assert not written  # it was not even told the state's layout


def test_a_stranger_in_the_donors_place_writes_nothing() -> None:
    donor, (joiner, written, _) = run_ranks(_pair, 2, args=("stranger_donor",), timeout=_T * 2)
    assert joiner.startswith("UntrustedPeerError: rank 0 could not prove"), joiner
    assert not written
    assert donor.startswith("UntrustedPeerError"), donor


def test_a_tampered_manifest_is_refused_before_anything_is_written() -> None:
    donor, (joiner, written, _) = run_ranks(_pair, 2, args=("tampered_manifest",), timeout=_T * 2)
    assert "IntegrityError: the manifest from rank 0 fails its MAC" in joiner, joiner
    assert not written
    assert donor != "ok"


def test_the_joiner_demands_data_macs_and_a_corrupt_message_fails_them() -> None:
    donor, (joiner, _, complete) = run_ranks(_pair, 2, args=("corrupt_data",), timeout=_T * 2)
    assert joiner.startswith("IntegrityError: 1 of "), joiner
    assert "failed their MAC" in joiner
    assert not complete
    assert donor.startswith("TransferError"), donor
    donor, (joiner, _, complete) = run_ranks(_pair, 2, args=("macs",), timeout=_T * 2)
    assert (donor, joiner, complete) == ("ok", "ok", True)


def test_the_rendezvous_store_listens_on_the_advertised_address_only() -> None:
    store = host_store("127.0.0.2", 0, timeout=timedelta(seconds=5))
    try:
        store.set("k", "v")
        with socket.create_connection(("127.0.0.2", store.port), timeout=5):
            pass
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", store.port), timeout=5).close()
    finally:
        del store
    with pytest.raises(ConfigError, match="cannot listen there"):
        host_store("192.0.2.1", 0, timeout=timedelta(seconds=5))  # not this machine's


def _vanished_joiner(rank: int, ws: int, pg: Any, store: dist.Store, case: str) -> object:
    """The donor sends to a joiner that formed the group, then left without a word."""
    if rank == 1:
        store.wait(["donor_done"], timedelta(seconds=60))  # alive, but never answers
        return None
    config = TransferConfig(handshake_timeout=timedelta(seconds=2))
    t0 = time.monotonic()
    if case == "dropped":  # the joiner says so on the store half a second in
        threading.Timer(0.5, lambda: store.set("dropped", "1")).start()

    def dropped() -> bool:
        return bool(store.check(["dropped"]))

    said = _outcome(
        lambda: send_state_dict(
            pg,
            [1],
            _state(1.0),
            timeout=timedelta(seconds=60),
            step=5,
            config=config,
            auth_key=_KEY,
            abandoned=dropped if case == "dropped" else None,
        )
    )
    took = time.monotonic() - t0
    store.set("donor_done", "1")
    return said, took


def test_a_donor_waits_for_a_vanished_joiner_no_longer_than_the_handshake_timeout() -> None:
    (said, took), _ = run_ranks(_vanished_joiner, 2, args=("silent",), timeout=_T * 2)
    assert said.startswith("TransferTimeoutError"), said
    assert 1.5 <= took < 10, took  # the handshake's 2 s, not the transfer's 60 s


def test_a_donor_stops_waiting_as_soon_as_its_joiner_says_it_left() -> None:
    (said, took), _ = run_ranks(_vanished_joiner, 2, args=("dropped",), timeout=_T * 2)
    assert said.startswith("TransferError: the transfer was abandoned while waiting"), said
    assert took < 1.5, took


def test_control_keys_on_a_store_count_only_when_they_prove_the_plans_key() -> None:
    """Anyone who reaches a donor's store can list and write its keys; a go or a
    dropped that is not a MAC under the plan's key is ignored."""
    from recoveryd.agent.rendezvous import (
        connect_store,
        dropped_key,
        go_key,
        proof,
        proves,
        read_go,
    )

    _S = timedelta(seconds=5)
    store = host_store("127.0.0.1", 0, timeout=_S)
    stranger = connect_store(f"127.0.0.1:{store.port}", timeout=timedelta(seconds=5))
    prefix = "recoveryd/c0ffee/plan/1001"
    stranger.set(go_key(prefix), "12:00")  # listed, guessed, written
    assert read_go(store, prefix, _KEY, timeout=_S) == "forged"
    stranger.set(dropped_key(prefix), "1")
    assert not proves(_KEY, store.get(dropped_key(prefix)), "dropped", prefix)
    # What the parties write does count, and only for its own step and plan.
    store.set(go_key(prefix), f"12:{proof(_KEY, 'go 12', prefix)}")
    assert read_go(store, prefix, _KEY, timeout=_S) == "set"
    assert read_go(store, prefix, _WRONG, timeout=_S) == "forged"
    store.set(go_key(prefix), f"13:{proof(_KEY, 'go 12', prefix)}")  # replayed at another step
    assert read_go(store, prefix, _KEY, timeout=_S) == "forged"
    assert proves(_KEY, proof(_KEY, "dropped", prefix).encode(), "dropped", prefix)
    assert not proves(_KEY, proof(_KEY, "dropped", prefix + "0").encode(), "dropped", prefix)
