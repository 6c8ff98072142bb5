from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_COMPLEX64: _ClassVar[DType]
    DTYPE_COMPLEX128: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3FN: _ClassVar[DType]
    DTYPE_FLOAT8_E5M2: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3FNUZ: _ClassVar[DType]
    DTYPE_FLOAT8_E5M2FNUZ: _ClassVar[DType]
    DTYPE_UINT16: _ClassVar[DType]
    DTYPE_UINT32: _ClassVar[DType]
    DTYPE_UINT64: _ClassVar[DType]
    DTYPE_COMPLEX32: _ClassVar[DType]
    DTYPE_FLOAT8_E8M0FNU: _ClassVar[DType]

class NodeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_KIND_UNSPECIFIED: _ClassVar[NodeKind]
    NODE_KIND_DICT: _ClassVar[NodeKind]
    NODE_KIND_ORDERED_DICT: _ClassVar[NodeKind]
    NODE_KIND_LIST: _ClassVar[NodeKind]
    NODE_KIND_TUPLE: _ClassVar[NodeKind]
    NODE_KIND_TENSOR: _ClassVar[NodeKind]
    NODE_KIND_DTENSOR: _ClassVar[NodeKind]
    NODE_KIND_SHARDED_TENSOR: _ClassVar[NodeKind]
    NODE_KIND_VALUE: _ClassVar[NodeKind]

class KeyKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_KIND_UNSPECIFIED: _ClassVar[KeyKind]
    KEY_KIND_STR: _ClassVar[KeyKind]
    KEY_KIND_INT: _ClassVar[KeyKind]
DTYPE_UNSPECIFIED: DType
DTYPE_BOOL: DType
DTYPE_UINT8: DType
DTYPE_INT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_COMPLEX64: DType
DTYPE_COMPLEX128: DType
DTYPE_FLOAT8_E4M3FN: DType
DTYPE_FLOAT8_E5M2: DType
DTYPE_FLOAT8_E4M3FNUZ: DType
DTYPE_FLOAT8_E5M2FNUZ: DType
DTYPE_UINT16: DType
DTYPE_UINT32: DType
DTYPE_UINT64: DType
DTYPE_COMPLEX32: DType
DTYPE_FLOAT8_E8M0FNU: DType
NODE_KIND_UNSPECIFIED: NodeKind
NODE_KIND_DICT: NodeKind
NODE_KIND_ORDERED_DICT: NodeKind
NODE_KIND_LIST: NodeKind
NODE_KIND_TUPLE: NodeKind
NODE_KIND_TENSOR: NodeKind
NODE_KIND_DTENSOR: NodeKind
NODE_KIND_SHARDED_TENSOR: NodeKind
NODE_KIND_VALUE: NodeKind
KEY_KIND_UNSPECIFIED: KeyKind
KEY_KIND_STR: KeyKind
KEY_KIND_INT: KeyKind

class Complex(_message.Message):
    __slots__ = ("real", "imag")
    REAL_FIELD_NUMBER: _ClassVar[int]
    IMAG_FIELD_NUMBER: _ClassVar[int]
    real: float
    imag: float
    def __init__(self, real: _Optional[float] = ..., imag: _Optional[float] = ...) -> None: ...

class IntList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, items: _Optional[_Iterable[int]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("none", "bool_value", "int_value", "float_value", "str_value", "bytes_value", "dtype_value", "size_value", "device_value", "complex_value", "big_int_value")
    NONE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STR_VALUE_FIELD_NUMBER: _ClassVar[int]
    BYTES_VALUE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_VALUE_FIELD_NUMBER: _ClassVar[int]
    SIZE_VALUE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_VALUE_FIELD_NUMBER: _ClassVar[int]
    COMPLEX_VALUE_FIELD_NUMBER: _ClassVar[int]
    BIG_INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    none: bool
    bool_value: bool
    int_value: int
    float_value: float
    str_value: str
    bytes_value: bytes
    dtype_value: DType
    size_value: IntList
    device_value: str
    complex_value: Complex
    big_int_value: str
    def __init__(self, none: _Optional[bool] = ..., bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., str_value: _Optional[str] = ..., bytes_value: _Optional[bytes] = ..., dtype_value: _Optional[_Union[DType, str]] = ..., size_value: _Optional[_Union[IntList, _Mapping]] = ..., device_value: _Optional[str] = ..., complex_value: _Optional[_Union[Complex, _Mapping]] = ..., big_int_value: _Optional[str] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("kind", "dim", "reduce_op", "split_factor")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Placement.Kind]
        KIND_REPLICATE: _ClassVar[Placement.Kind]
        KIND_SHARD: _ClassVar[Placement.Kind]
        KIND_PARTIAL: _ClassVar[Placement.Kind]
        KIND_STRIDED_SHARD: _ClassVar[Placement.Kind]
    KIND_UNSPECIFIED: Placement.Kind
    KIND_REPLICATE: Placement.Kind
    KIND_SHARD: Placement.Kind
    KIND_PARTIAL: Placement.Kind
    KIND_STRIDED_SHARD: Placement.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    REDUCE_OP_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FACTOR_FIELD_NUMBER: _ClassVar[int]
    kind: Placement.Kind
    dim: int
    reduce_op: str
    split_factor: int
    def __init__(self, kind: _Optional[_Union[Placement.Kind, str]] = ..., dim: _Optional[int] = ..., reduce_op: _Optional[str] = ..., split_factor: _Optional[int] = ...) -> None: ...

class DTensorMeta(_message.Message):
    __slots__ = ("local_tensor", "global_shape", "global_stride", "device_type", "mesh_shape", "mesh_dim_names", "placements", "mesh_ranks")
    LOCAL_TENSOR_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_SHAPE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STRIDE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MESH_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MESH_DIM_NAMES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    MESH_RANKS_FIELD_NUMBER: _ClassVar[int]
    local_tensor: int
    global_shape: _containers.RepeatedScalarFieldContainer[int]
    global_stride: _containers.RepeatedScalarFieldContainer[int]
    device_type: str
    mesh_shape: _containers.RepeatedScalarFieldContainer[int]
    mesh_dim_names: _containers.RepeatedScalarFieldContainer[str]
    placements: _containers.RepeatedCompositeFieldContainer[Placement]
    mesh_ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, local_tensor: _Optional[int] = ..., global_shape: _Optional[_Iterable[int]] = ..., global_stride: _Optional[_Iterable[int]] = ..., device_type: _Optional[str] = ..., mesh_shape: _Optional[_Iterable[int]] = ..., mesh_dim_names: _Optional[_Iterable[str]] = ..., placements: _Optional[_Iterable[_Union[Placement, _Mapping]]] = ..., mesh_ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class ShardMeta(_message.Message):
    __slots__ = ("offsets", "sizes", "group_rank")
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    group_rank: int
    def __init__(self, offsets: _Optional[_Iterable[int]] = ..., sizes: _Optional[_Iterable[int]] = ..., group_rank: _Optional[int] = ...) -> None: ...

class ShardedTensorMeta(_message.Message):
    __slots__ = ("global_size", "dtype", "requires_grad", "shards", "local_shard", "local_tensor", "group_ranks")
    GLOBAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_GRAD_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SHARD_FIELD_NUMBER: _ClassVar[int]
    LOCAL_TENSOR_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANKS_FIELD_NUMBER: _ClassVar[int]
    global_size: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    requires_grad: bool
    shards: _containers.RepeatedCompositeFieldContainer[ShardMeta]
    local_shard: _containers.RepeatedScalarFieldContainer[int]
    local_tensor: _containers.RepeatedScalarFieldContainer[int]
    group_ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, global_size: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., requires_grad: _Optional[bool] = ..., shards: _Optional[_Iterable[_Union[ShardMeta, _Mapping]]] = ..., local_shard: _Optional[_Iterable[int]] = ..., local_tensor: _Optional[_Iterable[int]] = ..., group_ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("format_version", "step", "node_kind", "node_arg", "key_kind", "key_str", "key_int", "values", "tensor_dtype", "tensor_ndim", "tensor_shape", "tensor_stride", "tensor_storage", "tensor_byte_offset", "tensor_requires_grad", "storage_nbytes", "message_nbytes", "dtensors", "sharded_tensors", "chain", "checksums", "star", "tensor_is_parameter")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NODE_KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_ARG_FIELD_NUMBER: _ClassVar[int]
    KEY_KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_STR_FIELD_NUMBER: _ClassVar[int]
    KEY_INT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_NDIM_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_STRIDE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_STORAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_BYTE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TENSOR_REQUIRES_GRAD_FIELD_NUMBER: _ClassVar[int]
    STORAGE_NBYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NBYTES_FIELD_NUMBER: _ClassVar[int]
    DTENSORS_FIELD_NUMBER: _ClassVar[int]
    SHARDED_TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    STAR_FIELD_NUMBER: _ClassVar[int]
    TENSOR_IS_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    step: int
    node_kind: _containers.RepeatedScalarFieldContainer[NodeKind]
    node_arg: _containers.RepeatedScalarFieldContainer[int]
    key_kind: _containers.RepeatedScalarFieldContainer[KeyKind]
    key_str: _containers.RepeatedScalarFieldContainer[str]
    key_int: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    tensor_dtype: _containers.RepeatedScalarFieldContainer[DType]
    tensor_ndim: _containers.RepeatedScalarFieldContainer[int]
    tensor_shape: _containers.RepeatedScalarFieldContainer[int]
    tensor_stride: _containers.RepeatedScalarFieldContainer[int]
    tensor_storage: _containers.RepeatedScalarFieldContainer[int]
    tensor_byte_offset: _containers.RepeatedScalarFieldContainer[int]
    tensor_requires_grad: _containers.RepeatedScalarFieldContainer[bool]
    storage_nbytes: _containers.RepeatedScalarFieldContainer[int]
    message_nbytes: _containers.RepeatedScalarFieldContainer[int]
    dtensors: _containers.RepeatedCompositeFieldContainer[DTensorMeta]
    sharded_tensors: _containers.RepeatedCompositeFieldContainer[ShardedTensorMeta]
    chain: _containers.RepeatedScalarFieldContainer[int]
    checksums: bool
    star: bool
    tensor_is_parameter: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, format_version: _Optional[int] = ..., step: _Optional[int] = ..., node_kind: _Optional[_Iterable[_Union[NodeKind, str]]] = ..., node_arg: _Optional[_Iterable[int]] = ..., key_kind: _Optional[_Iterable[_Union[KeyKind, str]]] = ..., key_str: _Optional[_Iterable[str]] = ..., key_int: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., tensor_dtype: _Optional[_Iterable[_Union[DType, str]]] = ..., tensor_ndim: _Optional[_Iterable[int]] = ..., tensor_shape: _Optional[_Iterable[int]] = ..., tensor_stride: _Optional[_Iterable[int]] = ..., tensor_storage: _Optional[_Iterable[int]] = ..., tensor_byte_offset: _Optional[_Iterable[int]] = ..., tensor_requires_grad: _Optional[_Iterable[bool]] = ..., storage_nbytes: _Optional[_Iterable[int]] = ..., message_nbytes: _Optional[_Iterable[int]] = ..., dtensors: _Optional[_Iterable[_Union[DTensorMeta, _Mapping]]] = ..., sharded_tensors: _Optional[_Iterable[_Union[ShardedTensorMeta, _Mapping]]] = ..., chain: _Optional[_Iterable[int]] = ..., checksums: _Optional[bool] = ..., star: _Optional[bool] = ..., tensor_is_parameter: _Optional[_Iterable[bool]] = ...) -> None: ...
