"""A hostile donor's offer is bounded: what it can make a joiner build, allocate and accept.

Real Gloo groups on loopback; hostile manifests are sent by hand the way a
donor sends its own (header, manifest, then the joiner's answer).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from datetime import timedelta

import pytest
import torch

from recoveryd.errors import ManifestError, StateMismatchError, TransferError
from recoveryd.testing import run_ranks, run_threads
from recoveryd.transport import TransferConfig, recv_state_dict, send_state_dict
from recoveryd.transport import format as w
from recoveryd.transport.config import MANIFEST_COST_PER_BYTE
from recoveryd.v1 import manifest_pb2 as pb
from tests.statedicts import assert_same

pytestmark = pytest.mark.integration
T = timedelta(seconds=30)


def _rss() -> tuple[int, int]:
    """This process's resident and peak resident bytes."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10


def _reset_peak() -> None:
    """Starts this process's peak RSS again from its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@pytest.fixture
def peak_rss() -> None:
    """Skips a test that measures peak RSS where it cannot be reset."""
    try:
        _reset_peak()
    except OSError as e:
        pytest.skip(f"cannot reset the peak RSS here: {e}")


def _tensor_manifest(shape: list[int], stride: list[int], span: int, messages: list[int]) -> bytes:
    m = pb.Manifest(format_version=w.FORMAT_VERSION, chain=[0, 1])
    m.node_kind.append(pb.NODE_KIND_TENSOR)
    m.node_arg.append(0)
    m.tensor_dtype.append(pb.DTYPE_UINT8 if stride == [1] else pb.DTYPE_FLOAT32)
    m.tensor_ndim.append(len(shape))
    m.tensor_shape.extend(shape)
    m.tensor_stride.extend(stride)
    m.tensor_storage.append(0)
    m.tensor_byte_offset.append(0)
    m.tensor_requires_grad.append(False)
    m.tensor_is_parameter.append(False)
    m.storage_nbytes.append(span)
    m.message_nbytes.extend(messages)
    return m.SerializeToString()


def _hostile(rank: int, ws: int, pg: object, store: object, body: bytes, cfg: object) -> object:
    if rank == 0:
        t = torch.frombuffer(bytearray(body), dtype=torch.uint8)
        pg.send([torch.tensor([w.MAGIC, w.FORMAT_VERSION, len(body), 0])], 1, w.TAG_HEADER).wait()  # type: ignore[attr-defined]
        pg.send([t], 1, w.TAG_MANIFEST).wait()  # type: ignore[attr-defined]
        ack = torch.zeros(2, dtype=torch.int64)
        pg.recv([ack], 1, w.TAG_ACK).wait()  # type: ignore[attr-defined]
        return int(ack[0])
    rss, _ = _rss()
    _reset_peak()
    with pytest.raises(ManifestError) as e:
        recv_state_dict(pg, 0, timeout=timedelta(seconds=20), config=cfg)  # type: ignore[arg-type]
    return str(e.value), _rss()[1] - rss


_ONE_BYTE_MESSAGES = _tensor_manifest([1 << 20], [1], 1 << 20, [1] * (1 << 20))
_TWO_GIB = _tensor_manifest([1 << 31], [1], 1 << 31, [1 << 30, 1 << 30])
_EXPANDED = _tensor_manifest([1 << 59], [0], 4, [4])


@pytest.mark.parametrize(
    ("body", "cfg", "needle"),
    [
        (_ONE_BYTE_MESSAGES, None, "1048576 messages for 1048576 bytes in 1 spans"),
        (_TWO_GIB, TransferConfig(max_alloc_bytes=1 << 30), "over its limit of 1073741824 bytes"),
        (_EXPANDED, None, "shape [576460752303423488] with strides [0] puts several elements"),
    ],
    ids=["one-byte-messages", "2-gib-in-63-bytes", "zero-stride"],
)
@pytest.mark.usefixtures("peak_rss")
def test_a_hostile_offer_is_refused_before_the_joiner_builds_or_allocates_it(
    body: bytes, cfg: object, needle: str
) -> None:
    ack, (text, grew) = run_ranks(_hostile, 2, args=(body, cfg))
    assert ack == w.ACK_BAD_MANIFEST, (ack, text)
    assert needle in text, text
    # Before the fixes: +325 MiB for the messages, 2 GiB pre-faulted for the bomb.
    assert grew < 64 << 20, f"the joiner's peak RSS grew by {grew} bytes"


def _optimizer_state(steps: int) -> dict[str, object]:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with torch.no_grad():  # not the global generator: ranks are threads here
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p) / (i + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        model(torch.randn(4, 8, generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": steps}


def _tampered(rank: int, ws: int, pg: object, store: object) -> object:
    if rank == 0:
        sd = _optimizer_state(3)
        group = sd["optim"]["param_groups"][0]  # type: ignore[index]
        group["lr"] = 1e9  # another value of the same type: not the problem
        group["foreach"] = True  # the joiner has None
        group["amsgrad"] = 0  # the joiner has a bool
        group["backdoor"] = "x"  # the joiner never had it
        with pytest.raises(TransferError, match="refused"):
            send_state_dict(pg, [1], sd, timeout=T)  # type: ignore[arg-type]
        return None
    mine = _optimizer_state(1)
    before = copy.deepcopy(mine)
    with pytest.raises(StateMismatchError) as e:
        recv_state_dict(pg, 0, into=mine, timeout=T)  # type: ignore[arg-type]
    assert_same(before, mine)  # nothing written: tensors bit for bit, values and keys
    return e.value.paths


def test_in_place_a_donor_cannot_change_value_types_or_add_keys() -> None:
    _, paths = run_threads(_tampered, 2)
    assert paths == [
        "optim.param_groups.0.amsgrad: bool here, int sent",
        "optim.param_groups.0.foreach: None here, bool sent",
        "optim.param_groups.0.backdoor: missing in the joiner's state_dict",
    ]


def _model_and_optimizer(rank: int, ws: int, pg: object, store: object) -> None:
    if rank == 0:
        sd = _optimizer_state(3)
        sd["optim"]["param_groups"][0]["lr"] = 5e-4  # type: ignore[index]
        send_state_dict(pg, [1], sd, step=3, timeout=T)  # type: ignore[arg-type]
        return
    mine = _optimizer_state(1)
    weight = mine["model"]["0.weight"]  # type: ignore[index]
    got = recv_state_dict(pg, 0, into=mine, step=3, timeout=T)  # type: ignore[arg-type]
    want = _optimizer_state(3)
    want["optim"]["param_groups"][0]["lr"] = 5e-4  # type: ignore[index]
    assert_same(want, got.state_dict)
    assert got.state_dict["model"]["0.weight"] is weight  # type: ignore[index]


def test_a_real_model_and_optimizer_recover_in_place_with_new_values() -> None:
    run_threads(_model_and_optimizer, 2)


def _expanded(rank: int, ws: int, pg: object, store: object) -> None:
    def state() -> dict[str, torch.Tensor]:
        return {
            "bias": torch.tensor([1.5, -2.0]).view(2, 1).expand(2, 1000),
            "windows": torch.arange(10.0).unfold(0, 4, 2),
            "w": torch.arange(6.0),
        }

    if rank == 0:
        send_state_dict(pg, [1], state(), timeout=T)  # type: ignore[arg-type]
        send_state_dict(pg, [1], state(), timeout=T)  # type: ignore[arg-type]
        return
    got = recv_state_dict(pg, 0, timeout=T).state_dict  # type: ignore[arg-type]
    for k, v in state().items():
        assert torch.equal(got[k], v), k  # type: ignore[index]
    base = torch.zeros(2, 1)
    mine = {"bias": base.expand(2, 1000), "windows": torch.zeros(4, 4), "w": torch.zeros(6)}
    recv_state_dict(pg, 0, into=mine, timeout=T)  # type: ignore[arg-type]
    assert torch.equal(base, torch.tensor([[1.5], [-2.0]]))  # the expanded tensor's own memory
    assert torch.equal(mine["windows"], state()["windows"])


def test_an_expanded_or_overlapping_view_round_trips_dense() -> None:
    run_threads(_expanded, 2)


# ---- what a manifest byte can cost: the worst manifests found, measured ----------------

_MEASURE = """
import sys, torch
from recoveryd.transport import receiver, TransferConfig
from recoveryd.v1 import manifest_pb2 as pb
from tests.integration.test_transport_bounds import _NoPrefault, _costly, _rss, _reset_peak

body = _costly(sys.argv[1], int(sys.argv[2]))
into = None if sys.argv[3] == "allocating" else {}
rss, _ = _rss()
_reset_peak()
m = pb.Manifest.FromString(body)
outcome = "built"
try:
    receiver._prepare(m, 0, 1, 2, None, TransferConfig(max_alloc_bytes=1 << 40),
                      receiver._Into(into, torch.device("cpu"), None, None), _NoPrefault())
except Exception as e:
    outcome = type(e).__name__
print(len(body), _rss()[1] - rss, outcome)
"""


class _NoPrefault:
    """Leaves fresh buffers' pages alone: only what the manifest makes the joiner build counts."""

    def start(self, buffers: object) -> None:
        pass

    def stop(self) -> None:
        pass


def _costly(shape: str, n: int) -> bytes:
    """A manifest of ``n`` of the costliest things found per manifest byte."""
    m = pb.Manifest(format_version=w.FORMAT_VERSION, chain=[0, 1])
    m.node_kind.append(pb.NODE_KIND_LIST)
    m.node_arg.append(n)
    if shape == "empty-lists":
        m.node_kind.extend([pb.NODE_KIND_LIST] * n)
        m.node_arg.extend([0] * n)
        return m.SerializeToString()
    # 0-d tensors, each in a 4-byte span sent as a message of its own.
    m.node_kind.extend([pb.NODE_KIND_TENSOR] * n)
    m.node_arg.extend(range(n))
    m.tensor_dtype.extend([pb.DTYPE_FLOAT32] * n)
    m.tensor_ndim.extend([0] * n)
    m.tensor_storage.extend(range(n))
    m.tensor_byte_offset.extend([0] * n)
    m.tensor_requires_grad.extend([False] * n)
    m.tensor_is_parameter.extend([False] * n)
    m.storage_nbytes.extend([4] * n)
    m.message_nbytes.extend([4] * n)
    return m.SerializeToString()


@pytest.mark.parametrize(
    ("shape", "n", "mode"),
    [
        ("0-d-tensors", 120_000, "allocating"),
        ("0-d-tensors", 120_000, "in-place"),
        ("empty-lists", 800_000, "allocating"),
    ],
)
@pytest.mark.usefixtures("peak_rss")
def test_a_manifest_byte_costs_the_joiner_at_most_the_stated_bound(
    shape: str, n: int, mode: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, shape, str(n), mode],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    size, peak, outcome = out.stdout.split()
    nbytes, grew = int(size), int(peak)
    # Allocating, the whole tree is built; in place, the joiner (an empty dict)
    # holds none of it, so the matching refuses it after decoding every column.
    assert outcome == ("built" if mode == "allocating" else "StateMismatchError"), outcome
    assert grew <= MANIFEST_COST_PER_BYTE * nbytes, (
        f"{shape} ({mode}): {grew} bytes for a {nbytes}-byte manifest, "
        f"{grew / nbytes:.0f} per byte (stated: at most {MANIFEST_COST_PER_BYTE})"
    )


def test_the_default_manifest_limit_bounds_an_offer_to_12_8_gib(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RECOVERYD_MAX_MANIFEST_BYTES", raising=False)
    assert MANIFEST_COST_PER_BYTE * TransferConfig().max_manifest_bytes == 12800 << 20
