"""The transport's contracts, on real Gloo groups over loopback (ranks as threads)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch

from recoveryd.errors import StateMismatchError, StepMismatchError, TransferError
from recoveryd.testing import run_ranks, run_threads
from recoveryd.transport import PGTransport, TransferConfig, recv_state_dict, send_state_dict
from tests.statedicts import assert_same, bits, every_kind

pytestmark = pytest.mark.integration
T = timedelta(seconds=30)


def _roundtrip(rank: int, ws: int, pg: object, store: object, fanout: str) -> object:
    cfg = TransferConfig(fanout=fanout, bucket_bytes=4096, direct_bytes=1024, checksums=True)  # type: ignore[arg-type]
    if rank == 0:
        return send_state_dict(pg, list(range(1, ws)), every_kind(), step=5, timeout=T, config=cfg)  # type: ignore[arg-type]
    got = recv_state_dict(pg, 0, step=5, timeout=T, config=cfg)  # type: ignore[arg-type]
    assert_same(every_kind(), got.state_dict)
    r = got.state_dict
    assert isinstance(r, dict)
    # Aliasing survives: tied weights and views share one storage again.
    ptr = r["flat"].untyped_storage().data_ptr()
    for k in ("view_a", "view_b", "tied_a"):
        assert r[k].untyped_storage().data_ptr() == ptr, k
    assert r["tied_a"] is not r["flat"] or True
    assert r["transposed"].stride() == every_kind()["transposed"].stride()  # type: ignore[attr-defined]
    assert got.step == 5
    return got.stats


@pytest.mark.parametrize("fanout", ["chain", "star"])
def test_every_kind_round_trips_bit_exact_to_three_receivers(fanout: str) -> None:
    stats = run_threads(_roundtrip, 4, args=(fanout,))
    sender = stats[0]
    # Each storage once: flat + its views + tied weight cost one 64x32 float buffer.
    assert sender.payload_bytes < sum(
        v.numel() * v.element_size() for v in every_kind().values() if isinstance(v, torch.Tensor)
    )
    data_out = sender.bytes_sent - stats[1].bytes_received + stats[1].payload_bytes
    if fanout == "chain":
        # The sender's link carries the state once; receivers relay it.
        assert data_out < 2 * sender.payload_bytes
        assert stats[1].bytes_sent > stats[1].payload_bytes
        assert stats[3].bytes_sent < stats[3].payload_bytes
    else:
        assert sender.bytes_sent >= 3 * sender.payload_bytes


def _in_place(rank: int, ws: int, pg: object, store: object) -> object:
    if rank == 0:
        send_state_dict(pg, [1], every_kind(seed=1), step=9, timeout=T)  # type: ignore[arg-type]
        return None
    mine = every_kind(seed=2)
    before = {k: v for k, v in mine.items() if isinstance(v, torch.Tensor)}
    ptrs = {k: v.data_ptr() for k, v in before.items()}
    got = recv_state_dict(pg, 0, into=mine, timeout=T)  # type: ignore[arg-type]
    assert_same(every_kind(seed=1), got.state_dict)
    r = got.state_dict
    assert isinstance(r, dict)
    for k, v in before.items():
        assert r[k] is v, f"{k} is not the receiver's own tensor object"
        assert v.data_ptr() == ptrs[k]
    return got.stats


def test_in_place_receive_writes_into_the_receivers_own_tensors() -> None:
    run_threads(_in_place, 2)


def _mismatch(rank: int, ws: int, pg: object, store: object) -> str:
    sent = {"a": torch.ones(4), "b": torch.ones(2, 2), "c": torch.ones(3), "n": 1}
    if rank == 0:
        with pytest.raises(TransferError, match="refused") as e:
            send_state_dict(pg, [1], sent, timeout=T)  # type: ignore[arg-type]
        return str(e.value)
    mine = {
        "a": torch.zeros(5),
        "b": torch.zeros(2, 2, dtype=torch.float64),
        "d": torch.zeros(1),
        "n": 2,
    }
    snapshot = {k: bits(v).clone() for k, v in mine.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(StateMismatchError) as e:
        recv_state_dict(pg, 0, into=mine, timeout=T)  # type: ignore[arg-type]
    text = str(e.value)
    for needle in (
        "a: shape [5] here, [4] sent",
        "b: dtype torch.float64",
        "c: missing",
        "d: not in the donor",
    ):
        assert needle in text, text
    assert len(e.value.paths) == 4
    for k, v in snapshot.items():
        assert torch.equal(bits(mine[k]), v), f"{k} was written"  # type: ignore[arg-type]
    return text


def test_mismatching_in_place_state_is_refused_before_any_write() -> None:
    run_threads(_mismatch, 2)


def _step(rank: int, ws: int, pg: object, store: object) -> None:
    if rank == 0:
        with pytest.raises(TransferError, match="step"):
            send_state_dict(pg, [1], {"w": torch.ones(3)}, step=4, timeout=T)  # type: ignore[arg-type]
    else:
        with pytest.raises(StepMismatchError) as e:
            recv_state_dict(pg, 0, step=5, timeout=T)  # type: ignore[arg-type]
        assert (e.value.expected, e.value.actual) == (5, 4)


def test_step_mismatch_is_a_clear_error_on_both_sides() -> None:
    run_threads(_step, 2)


def _many_small(rank: int, ws: int, pg: object, store: object) -> object:
    sd = {
        "state": {i: {"exp_avg": torch.full((256,), float(i))} for i in range(20_000)},
        "meta": {f"k{i}": i for i in range(1_000)},
    }
    if rank == 0:
        return send_state_dict(pg, [1], sd, timeout=T)  # type: ignore[arg-type]
    got = recv_state_dict(pg, 0, timeout=T)  # type: ignore[arg-type]
    r = got.state_dict
    assert isinstance(r, dict)
    assert torch.equal(r["state"][19_999]["exp_avg"], sd["state"][19_999]["exp_avg"])  # type: ignore[index]
    assert r["meta"] == sd["meta"]
    return got.stats


def test_small_tensors_travel_in_few_messages() -> None:
    sender, receiver = run_threads(_many_small, 2)
    # 20,000 x 1 KiB in 16 MiB buckets: a couple of data messages plus a handful of
    # control messages, not one per tensor.
    assert sender.messages < 16, sender
    assert receiver.messages < 16, receiver
    assert sender.payload_bytes == 20_000 * 1024


def _views(rank: int, ws: int, pg: object, store: object) -> object:
    buf = torch.arange(64 * 1024, dtype=torch.float32)
    sd = {f"p{i}": buf[i * 1024 : (i + 1) * 1024].view(32, 32) for i in range(64)}
    if rank == 0:
        return send_state_dict(pg, [1], sd, timeout=T)  # type: ignore[arg-type]
    got = recv_state_dict(pg, 0, timeout=T)  # type: ignore[arg-type]
    r = got.state_dict
    assert isinstance(r, dict)
    assert len({v.untyped_storage().data_ptr() for v in r.values()}) == 1
    assert r["p0"].untyped_storage().nbytes() == buf.numel() * 4
    r["p0"].view(-1)[1024 - 1] = -1.0  # views of one buffer: writes stay in place
    assert r["p1"].view(-1)[0].item() == 1024.0
    return got.stats


def test_views_of_one_buffer_send_its_bytes_once_and_stay_views() -> None:
    sender, _ = run_threads(_views, 2)
    assert sender.payload_bytes == 64 * 1024 * 4


def _drop_in(rank: int, ws: int, pg: object, store: object) -> None:
    mine = {"w": torch.zeros(8), "b": torch.zeros(2)}
    t = PGTransport(pg, T, torch.device("cpu"), state_dict=(lambda: mine) if rank == 1 else None)  # type: ignore[arg-type]
    if rank == 0:
        t.send_checkpoint([1], {"w": torch.arange(8.0), "b": torch.ones(2)})
    else:
        out = t.recv_checkpoint(0)
        assert isinstance(out, dict)
        assert out["w"] is mine["w"]
        assert torch.equal(mine["w"], torch.arange(8.0))


def test_pg_transport_drop_in() -> None:
    run_threads(_drop_in, 2)


def _ring(rank: int, ws: int, pg: object, store: object) -> None:
    import threading

    mine = {"rank": rank, "w": torch.full((1000,), float(rank))}
    err: list[BaseException] = []

    def send() -> None:
        try:
            send_state_dict(pg, [(rank + 1) % ws], mine, step=rank, timeout=T)  # type: ignore[arg-type]
        except BaseException as e:
            err.append(e)

    th = threading.Thread(target=send)
    th.start()
    got = recv_state_dict(pg, (rank - 1) % ws, step=(rank - 1) % ws, timeout=T)  # type: ignore[arg-type]
    th.join(T.total_seconds())
    assert not err, err
    r = got.state_dict
    assert isinstance(r, dict)
    assert r["rank"] == (rank - 1) % ws
    assert torch.equal(r["w"], torch.full((1000,), float((rank - 1) % ws)))


def test_ring_exchange_on_eight_ranks() -> None:
    # Real processes: every rank sends to its right and receives from its left at once.
    run_ranks(_ring, 8, timeout=timedelta(seconds=240))


def _silent(rank: int, ws: int, pg: object, store: object) -> float:
    if rank == 0:
        time.sleep(4)  # says nothing for longer than the receiver's timeout
        return 0.0
    start = time.monotonic()
    from recoveryd.errors import TransferTimeoutError
    from recoveryd.transport import _wire

    before = len(getattr(pg, "_recoveryd_orphans", [])) + len(_wire._UNPARKABLE)
    with pytest.raises(TransferTimeoutError):
        recv_state_dict(pg, 0, timeout=timedelta(seconds=1.5))  # type: ignore[arg-type]
    took = time.monotonic() - start
    # The header receive Gloo still holds keeps its buffer alive with the group.
    after = len(getattr(pg, "_recoveryd_orphans", [])) + len(_wire._UNPARKABLE)
    assert after == before + 1
    return took


def test_silent_peer_times_out_within_the_deadline() -> None:
    _, took = run_threads(_silent, 2)
    assert 1.4 < took < 3.0, took


def _in_place_layouts(rank: int, ws: int, pg: object, store: object) -> None:
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(40, generator=g)
    z = torch.randn(3, dtype=torch.complex64, generator=g)
    sent = {
        "slice": torch.arange(8.0)[1:4],  # span padded to 16 bytes: byte 0 is not its own
        "gap_a": flat[0:2],  # two views with a gap between them in one span
        "gap_b": flat[3:5],
        "d": torch.tensor([42.0]),
        "conj": z.conj(),  # a lazy conjugate view
        "neg_imag": z.conj().imag,
    }
    if rank == 0:
        send_state_dict(pg, [1], sent, timeout=T)  # type: ignore[arg-type]
        return
    y = torch.full((8,), -9.0)
    buf = torch.full((5,), -1.0)
    # The receiver's own layout: d sits in the gap of gap_a/gap_b; parameters need no grad.
    mine = {
        "slice": y[1:4],
        "gap_a": buf[0:2],
        "gap_b": buf[3:5],
        "d": buf[2:3],
        "conj": torch.zeros(3, dtype=torch.complex64),
        "neg_imag": torch.zeros(3),
    }
    recv_state_dict(pg, 0, into=mine, timeout=T)  # type: ignore[arg-type]
    assert y[0].item() == -9.0, "a byte outside every received tensor was written"
    assert torch.equal(y[1:4], sent["slice"])
    assert buf[2].item() == 42.0
    assert torch.equal(mine["gap_a"], sent["gap_a"])
    assert torch.equal(mine["conj"], sent["conj"].resolve_conj())
    assert torch.equal(mine["neg_imag"], sent["neg_imag"].resolve_neg())


def test_in_place_writes_only_the_bytes_of_received_tensors() -> None:
    run_threads(_in_place_layouts, 2)


def _params(rank: int, ws: int, pg: object, store: object) -> None:
    if rank == 0:
        flat = torch.arange(12.0)
        sent = {"w": torch.nn.Parameter(flat[:8].view(2, 4)), "b": torch.nn.Parameter(flat[8:])}
        send_state_dict(pg, [1], sent, timeout=T)  # type: ignore[arg-type]
        return
    model = torch.nn.Linear(4, 2)
    mine = {"w": model.weight, "b": torch.nn.Parameter(torch.zeros(4))}
    recv_state_dict(pg, 0, into=mine, timeout=T)  # type: ignore[arg-type]
    assert torch.equal(model.weight.detach(), torch.arange(8.0).view(2, 4))
    assert model.weight.requires_grad


def test_in_place_into_parameters_of_another_layout() -> None:
    run_threads(_params, 2)


def _sender_fails(rank: int, ws: int, pg: object, store: object) -> float:
    if rank == 0:
        from recoveryd.errors import UnsupportedValueError

        with pytest.raises(UnsupportedValueError):
            send_state_dict(pg, [1], {"fn": print}, timeout=T)  # type: ignore[arg-type]
        return 0.0
    start = time.monotonic()
    with pytest.raises(TransferError, match="could not send its state"):
        recv_state_dict(pg, 0, timeout=T)  # type: ignore[arg-type]
    return time.monotonic() - start


def test_receiver_learns_at_once_when_the_sender_cannot_send() -> None:
    _, took = run_threads(_sender_fails, 2)
    assert took < 5.0, took


def _too_big(rank: int, ws: int, pg: object, store: object) -> None:
    if rank == 0:
        with pytest.raises(TransferError, match="refused"):
            send_state_dict(pg, [1], {"w": torch.zeros(1 << 20)}, timeout=T)  # type: ignore[arg-type]
        return
    from recoveryd.errors import ManifestError

    with pytest.raises(ManifestError, match="over this joiner's limit"):
        recv_state_dict(pg, 0, timeout=T, config=TransferConfig(max_state_bytes=1 << 20))  # type: ignore[arg-type]


def test_state_over_the_receivers_limit_is_refused_before_allocating() -> None:
    run_threads(_too_big, 2)
