"""TransferConfig validation and the error hierarchy."""

from __future__ import annotations

import pytest

import recoveryd
from recoveryd.errors import (
    ConfigError,
    PeerLostError,
    RecoverydError,
    StateMismatchError,
    TransferTimeoutError,
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
