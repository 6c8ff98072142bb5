"""The mapping between torch dtypes and the manifest's DType enum."""

from __future__ import annotations

import torch

from recoveryd.v1 import manifest_pb2 as pb

_NAMES: dict[str, int] = {
    "bool": pb.DTYPE_BOOL,
    "uint8": pb.DTYPE_UINT8,
    "int8": pb.DTYPE_INT8,
    "int16": pb.DTYPE_INT16,
    "int32": pb.DTYPE_INT32,
    "int64": pb.DTYPE_INT64,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "float32": pb.DTYPE_FLOAT32,
    "float64": pb.DTYPE_FLOAT64,
    "complex64": pb.DTYPE_COMPLEX64,
    "complex128": pb.DTYPE_COMPLEX128,
    "complex32": pb.DTYPE_COMPLEX32,
    "float8_e4m3fn": pb.DTYPE_FLOAT8_E4M3FN,
    "float8_e5m2": pb.DTYPE_FLOAT8_E5M2,
    "float8_e4m3fnuz": pb.DTYPE_FLOAT8_E4M3FNUZ,
    "float8_e5m2fnuz": pb.DTYPE_FLOAT8_E5M2FNUZ,
    "float8_e8m0fnu": pb.DTYPE_FLOAT8_E8M0FNU,
    "uint16": pb.DTYPE_UINT16,
    "uint32": pb.DTYPE_UINT32,
    "uint64": pb.DTYPE_UINT64,
}

# Only the dtypes this torch build has (float8 variants came and went).
TO_PB: dict[torch.dtype, int] = {
    getattr(torch, name): code for name, code in _NAMES.items() if hasattr(torch, name)
}
FROM_PB: dict[int, torch.dtype] = {code: dtype for dtype, code in TO_PB.items()}
