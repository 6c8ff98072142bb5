"""TransferConfig validation, the error hierarchy, and errors crossing a process boundary."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

import recoveryd
from recoveryd.errors import (
    ConfigError,
    CoordinatorUnavailableError,
    PeerLostError,
    RecoverydError,
    SidecarLostError,
    StateMismatchError,
    StepMismatchError,
    TransferTimeoutError,
    UnknownMemberError,
    error_from_fields,
    error_to_fields,
)
from recoveryd.transport import TransferConfig


def test_defaults() -> None:
    c = TransferConfig()
    assert c.bucket_bytes == 16 << 20
    assert not c.checksums
    assert not c.hugepages
    assert c.fanout == "chain"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECOVERYD_BUCKET_BYTES", "65536")
    monkeypatch.setenv("RECOVERYD_CHECKSUMS", "on")
    monkeypatch.setenv("RECOVERYD_FANOUT", "star")
    c = TransferConfig()
    assert (c.bucket_bytes, c.checksums, c.fanout) == (65536, True, "star")
    assert TransferConfig(bucket_bytes=8192).bucket_bytes == 8192


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"bucket_bytes": 10}, "bucket_bytes"), ({"fanout": "tree"}, "fanout")],
)
def test_bad_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        TransferConfig(**kwargs)  # type: ignore[arg-type]
    assert e.value.field == field
    assert isinstance(e.value, ValueError)


def test_bad_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECOVERYD_CHECKSUMS", "maybe")
    with pytest.raises(ConfigError, match="RECOVERYD_CHECKSUMS"):
        TransferConfig()


def test_errors_subclass_one_root_and_the_matching_builtin() -> None:
    assert issubclass(TransferTimeoutError, RecoverydError)
    assert issubclass(TransferTimeoutError, TimeoutError)
    assert issubclass(PeerLostError, ConnectionError)
    e = StateMismatchError([f"p{i}: x" for i in range(60)])
    assert len(e.paths) == 60
    assert "and 10 more" in str(e)


def test_public_api_is_small_and_importable() -> None:
    for name in recoveryd.__all__:
        assert hasattr(recoveryd, name), name
    assert len(recoveryd.__all__) < 20


# ---- errors across a process boundary ----------------------------------------------


@pytest.mark.parametrize(
    "err",
    [
        ConfigError("bucket_bytes", 10, "must be at least 4096"),
        StepMismatchError(12, 14, peer_rank=0),
        StateMismatchError(["a: shape [5] here, [4] sent", "b: missing"]),
        TransferTimeoutError("slow", peer_rank=1),
        PeerLostError("gone", peer_rank=0),
        CoordinatorUnavailableError("coord:29400", "UNAVAILABLE"),
        UnknownMemberError("r1", 3),
        SidecarLostError("/run/agent.sock", "closed"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_error_crosses_with_its_type_message_and_facts(err: RecoverydError) -> None:
    fields = json.loads(json.dumps(error_to_fields(err)))  # as it travels
    back = error_from_fields(fields)
    assert type(back) is type(err)
    assert str(back) == str(err)
    for name in type(err).facts:
        assert getattr(back, name) == getattr(err, name), name
    for cls in type(err).__mro__[1:]:
        assert isinstance(back, cls)  # TimeoutError, ConnectionError, KeyError... still hold


def test_facts_that_are_not_plain_data_cross_as_their_repr() -> None:
    back = error_from_fields(error_to_fields(ConfigError("timeout", timedelta(0), "positive")))
    assert isinstance(back, ConfigError)
    assert back.value == "datetime.timedelta(0)"


def test_a_huge_mismatch_crosses_cut_to_a_bounded_size() -> None:
    err = StateMismatchError(
        [f"model.layers.{i}.weight: shape [4] here, [5] sent" for i in range(200_000)]
    )
    fields = error_to_fields(err)
    assert len(json.dumps(fields)) < 200_000  # was 17 MB: past a sidecar frame's limit
    back = error_from_fields(fields)
    assert isinstance(back, StateMismatchError)
    assert back.paths == err.paths[:1000]
    assert str(back) == str(err)  # the message lists the first 50 and counts the rest


def test_other_errors_cross_as_a_recoveryd_error_naming_their_type() -> None:
    back = error_from_fields(error_to_fields(KeyError("x")))
    assert type(back) is RecoverydError
    assert str(back) == "KeyError: 'x'"


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"type": "SystemExit", "message": "x", "facts": {}}, "not an error description"),
        ({"type": "ConfigError", "message": 3, "facts": {}}, "not an error description"),
        ({"type": "ConfigError", "message": "x", "facts": {"__class__": "y"}}, "carries no fact"),
        ({"type": "ConfigError", "message": "x", "facts": {"value": {"a": 1}}}, "not plain data"),
        ({"type": "ConfigError", "message": "x", "facts": []}, "not an error description"),
    ],
    ids=["unknown-type", "message-not-text", "unknown-fact", "fact-not-plain", "facts-not-a-map"],
)
def test_a_malformed_error_description_is_refused(fields: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        error_from_fields(fields)
