"""State dicts shaped like the real thing, shared by the transport tests."""

from __future__ import annotations

from collections import OrderedDict

import torch


def every_kind(seed: int = 0) -> dict[str, object]:
    """Every leaf kind a model/optimizer/DCP state_dict holds, on CPU."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(64, 32, generator=g)
    tensors: dict[str, object] = {
        f"dtype_{d}": torch.randn(5, 3, generator=g).to(d)
        for d in (
            torch.float32,
            torch.float64,
            torch.float16,
            torch.bfloat16,
            torch.complex64,
            torch.complex128,
            torch.int8,
            torch.int16,
            torch.int32,
            torch.int64,
            torch.uint8,
        )
    }
    tensors["bool"] = torch.randn(7, generator=g) > 0
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            tensors[name] = torch.randn(6, generator=g).to(getattr(torch, name))
    return {
        **tensors,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(6, 4, generator=g).t(),
        "offset": torch.randn(100, generator=g)[17:60],
        "strided": torch.randn(10, 10, generator=g)[:, ::2],
        "flat": flat,
        "view_a": flat[:16],
        "view_b": flat[16:48],
        "tied_a": flat,
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
        "nested": {
            "list": [torch.arange(4), 1, 2.5, "s", b"raw", None, True],
            "tuple": (torch.ones(2), (1, 2), torch.Size([3, 4])),
            "od": OrderedDict([("x", torch.zeros(3)), ("y", 7)]),
        },
        "values": {
            "dtype": torch.bfloat16,
            "device": torch.device("cpu"),
            "complex": 1 + 2j,
            "big": 1 << 70,
            "neg": -5,
        },
        "optim": {
            "state": {
                0: {"step": torch.tensor(10.0), "exp_avg": torch.randn(4, generator=g)},
                1: {"step": torch.tensor(10.0), "exp_avg": torch.randn(2, 2, generator=g)},
            },
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1], "foreach": None}],
        },
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, for bit-exact comparison (NaNs and -0.0 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: object, b: object, path: str = "") -> None:
    """Bit-exact equality of two state_dicts, containers and types included."""
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"  # type: ignore[call-overload]
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")  # type: ignore[index]
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert len(a) == len(b), path  # type: ignore[arg-type]
        for i, (x, y) in enumerate(zip(a, b, strict=False)):  # type: ignore[call-overload]
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.requires_grad == b.requires_grad, f"{path}: requires_grad differs"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} vs {b.shape}"
        assert torch.equal(bits(a), bits(b)), f"{path}: values differ"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"
