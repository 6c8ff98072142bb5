from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LeaveRequest(_message.Message):
    __slots__ = ("replica_id", "group_rank", "agent_id", "rank_secret")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_SECRET_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    group_rank: int
    agent_id: str
    rank_secret: str
    def __init__(self, replica_id: _Optional[str] = ..., group_rank: _Optional[int] = ..., agent_id: _Optional[str] = ..., rank_secret: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("left",)
    LEFT_FIELD_NUMBER: _ClassVar[int]
    left: bool
    def __init__(self, left: _Optional[bool] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("replica_id", "group_rank", "group_world_size", "layout_fingerprint", "device_kind", "rendezvous", "labels", "step", "agent_id", "interface")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    GROUP_WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    group_rank: int
    group_world_size: int
    layout_fingerprint: str
    device_kind: str
    rendezvous: str
    labels: _containers.ScalarMap[str, str]
    step: int
    agent_id: str
    interface: str
    def __init__(self, replica_id: _Optional[str] = ..., group_rank: _Optional[int] = ..., group_world_size: _Optional[int] = ..., layout_fingerprint: _Optional[str] = ..., device_kind: _Optional[str] = ..., rendezvous: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., step: _Optional[int] = ..., agent_id: _Optional[str] = ..., interface: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("member", "rank_secret")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    RANK_SECRET_FIELD_NUMBER: _ClassVar[int]
    member: Member
    rank_secret: str
    def __init__(self, member: _Optional[_Union[Member, _Mapping]] = ..., rank_secret: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("coordinator_id", "heartbeat_interval_s", "rank_secret")
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    RANK_SECRET_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    heartbeat_interval_s: float
    rank_secret: str
    def __init__(self, coordinator_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., rank_secret: _Optional[str] = ...) -> None: ...

class Beat(_message.Message):
    __slots__ = ("replica_id", "group_rank", "step", "healthy", "rank_secret")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    RANK_SECRET_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    group_rank: int
    step: int
    healthy: bool
    rank_secret: str
    def __init__(self, replica_id: _Optional[str] = ..., group_rank: _Optional[int] = ..., step: _Optional[int] = ..., healthy: _Optional[bool] = ..., rank_secret: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("beats",)
    BEATS_FIELD_NUMBER: _ClassVar[int]
    beats: _containers.RepeatedCompositeFieldContainer[Beat]
    def __init__(self, beats: _Optional[_Iterable[_Union[Beat, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("coordinator_id", "unknown")
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    unknown: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, coordinator_id: _Optional[str] = ..., unknown: _Optional[_Iterable[int]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("replica_id", "group_rank", "rank_secret")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    RANK_SECRET_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    group_rank: int
    rank_secret: str
    def __init__(self, replica_id: _Optional[str] = ..., group_rank: _Optional[int] = ..., rank_secret: _Optional[str] = ...) -> None: ...

class Order(_message.Message):
    __slots__ = ("kind", "plan_id", "joiner", "step", "timeout_s", "rendezvous_prefix", "backend", "plan_key")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Order.Kind]
        PREPARE: _ClassVar[Order.Kind]
        ARM: _ClassVar[Order.Kind]
        CANCEL: _ClassVar[Order.Kind]
    KIND_UNSPECIFIED: Order.Kind
    PREPARE: Order.Kind
    ARM: Order.Kind
    CANCEL: Order.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    JOINER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_PREFIX_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PLAN_KEY_FIELD_NUMBER: _ClassVar[int]
    kind: Order.Kind
    plan_id: int
    joiner: str
    step: int
    timeout_s: float
    rendezvous_prefix: str
    backend: str
    plan_key: bytes
    def __init__(self, kind: _Optional[_Union[Order.Kind, str]] = ..., plan_id: _Optional[int] = ..., joiner: _Optional[str] = ..., step: _Optional[int] = ..., timeout_s: _Optional[float] = ..., rendezvous_prefix: _Optional[str] = ..., backend: _Optional[str] = ..., plan_key: _Optional[bytes] = ...) -> None: ...

class AcknowledgeRequest(_message.Message):
    __slots__ = ("plan_id", "replica_id", "group_rank", "step", "idle", "step_time_s", "rank_secret")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    RANK_SECRET_FIELD_NUMBER: _ClassVar[int]
    plan_id: int
    replica_id: str
    group_rank: int
    step: int
    idle: bool
    step_time_s: float
    rank_secret: str
    def __init__(self, plan_id: _Optional[int] = ..., replica_id: _Optional[str] = ..., group_rank: _Optional[int] = ..., step: _Optional[int] = ..., idle: _Optional[bool] = ..., step_time_s: _Optional[float] = ..., rank_secret: _Optional[str] = ...) -> None: ...

class AcknowledgeResponse(_message.Message):
    __slots__ = ("active",)
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    active: bool
    def __init__(self, active: _Optional[bool] = ...) -> None: ...

class RecoverRequest(_message.Message):
    __slots__ = ("replica_id", "group_rank", "wait_s", "received_plan_id", "joined_plan_id", "rank_secret")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    JOINED_PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_SECRET_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    group_rank: int
    wait_s: float
    received_plan_id: int
    joined_plan_id: int
    rank_secret: str
    def __init__(self, replica_id: _Optional[str] = ..., group_rank: _Optional[int] = ..., wait_s: _Optional[float] = ..., received_plan_id: _Optional[int] = ..., joined_plan_id: _Optional[int] = ..., rank_secret: _Optional[str] = ...) -> None: ...

class RecoverResponse(_message.Message):
    __slots__ = ("state", "reason", "plan_id", "donor", "step", "rendezvous", "rendezvous_prefix", "timeout_s", "backend", "fresh", "plan_key", "stripes")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[RecoverResponse.State]
        NO_DONOR: _ClassVar[RecoverResponse.State]
        WAIT: _ClassVar[RecoverResponse.State]
        TRANSFER: _ClassVar[RecoverResponse.State]
        DONE: _ClassVar[RecoverResponse.State]
    STATE_UNSPECIFIED: RecoverResponse.State
    NO_DONOR: RecoverResponse.State
    WAIT: RecoverResponse.State
    TRANSFER: RecoverResponse.State
    DONE: RecoverResponse.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    DONOR_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_PREFIX_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    FRESH_FIELD_NUMBER: _ClassVar[int]
    PLAN_KEY_FIELD_NUMBER: _ClassVar[int]
    STRIPES_FIELD_NUMBER: _ClassVar[int]
    state: RecoverResponse.State
    reason: str
    plan_id: int
    donor: str
    step: int
    rendezvous: str
    rendezvous_prefix: str
    timeout_s: float
    backend: str
    fresh: bool
    plan_key: bytes
    stripes: _containers.RepeatedCompositeFieldContainer[Stripe]
    def __init__(self, state: _Optional[_Union[RecoverResponse.State, str]] = ..., reason: _Optional[str] = ..., plan_id: _Optional[int] = ..., donor: _Optional[str] = ..., step: _Optional[int] = ..., rendezvous: _Optional[str] = ..., rendezvous_prefix: _Optional[str] = ..., timeout_s: _Optional[float] = ..., backend: _Optional[str] = ..., fresh: _Optional[bool] = ..., plan_key: _Optional[bytes] = ..., stripes: _Optional[_Iterable[_Union[Stripe, _Mapping]]] = ...) -> None: ...

class Stripe(_message.Message):
    __slots__ = ("donor", "rendezvous", "rendezvous_prefix", "share")
    DONOR_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_PREFIX_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    donor: str
    rendezvous: str
    rendezvous_prefix: str
    share: float
    def __init__(self, donor: _Optional[str] = ..., rendezvous: _Optional[str] = ..., rendezvous_prefix: _Optional[str] = ..., share: _Optional[float] = ...) -> None: ...

class TransferReport(_message.Message):
    __slots__ = ("plan_id", "replica_id", "group_rank", "role", "result", "message", "step", "bytes", "seconds", "phases", "address", "rank_secret", "blame")
    class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ROLE_UNSPECIFIED: _ClassVar[TransferReport.Role]
        DONOR: _ClassVar[TransferReport.Role]
        JOINER: _ClassVar[TransferReport.Role]
    ROLE_UNSPECIFIED: TransferReport.Role
    DONOR: TransferReport.Role
    JOINER: TransferReport.Role
    class PhasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RANK_SECRET_FIELD_NUMBER: _ClassVar[int]
    BLAME_FIELD_NUMBER: _ClassVar[int]
    plan_id: int
    replica_id: str
    group_rank: int
    role: TransferReport.Role
    result: str
    message: str
    step: int
    bytes: int
    seconds: float
    phases: _containers.ScalarMap[str, float]
    address: str
    rank_secret: str
    blame: str
    def __init__(self, plan_id: _Optional[int] = ..., replica_id: _Optional[str] = ..., group_rank: _Optional[int] = ..., role: _Optional[_Union[TransferReport.Role, str]] = ..., result: _Optional[str] = ..., message: _Optional[str] = ..., step: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., phases: _Optional[_Mapping[str, float]] = ..., address: _Optional[str] = ..., rank_secret: _Optional[str] = ..., blame: _Optional[str] = ...) -> None: ...

class ReportTransferResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("recent", "page_size", "page_token")
    RECENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    recent: int
    page_size: int
    page_token: str
    def __init__(self, recent: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("group_rank", "step", "healthy", "last_seen_s", "rendezvous", "device_kind", "labels", "interface")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    group_rank: int
    step: int
    healthy: bool
    last_seen_s: float
    rendezvous: str
    device_kind: str
    labels: _containers.ScalarMap[str, str]
    interface: str
    def __init__(self, group_rank: _Optional[int] = ..., step: _Optional[int] = ..., healthy: _Optional[bool] = ..., last_seen_s: _Optional[float] = ..., rendezvous: _Optional[str] = ..., device_kind: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., interface: _Optional[str] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica_id", "world_size", "step", "healthy", "state", "ranks")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    world_size: int
    step: int
    healthy: bool
    state: str
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    def __init__(self, replica_id: _Optional[str] = ..., world_size: _Optional[int] = ..., step: _Optional[int] = ..., healthy: _Optional[bool] = ..., state: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ...) -> None: ...

class PlanStatus(_message.Message):
    __slots__ = ("plan_id", "joiner", "donor", "step", "state", "age_s", "ranks_done", "reason", "bytes", "recovery_s", "phases", "addresses", "attempt", "transfer_s", "donors")
    class PhasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    JOINER_FIELD_NUMBER: _ClassVar[int]
    DONOR_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    RANKS_DONE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_S_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    DONORS_FIELD_NUMBER: _ClassVar[int]
    plan_id: int
    joiner: str
    donor: str
    step: int
    state: str
    age_s: float
    ranks_done: int
    reason: str
    bytes: int
    recovery_s: float
    phases: _containers.ScalarMap[str, float]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    attempt: int
    transfer_s: float
    donors: _containers.RepeatedCompositeFieldContainer[PlanDonor]
    def __init__(self, plan_id: _Optional[int] = ..., joiner: _Optional[str] = ..., donor: _Optional[str] = ..., step: _Optional[int] = ..., state: _Optional[str] = ..., age_s: _Optional[float] = ..., ranks_done: _Optional[int] = ..., reason: _Optional[str] = ..., bytes: _Optional[int] = ..., recovery_s: _Optional[float] = ..., phases: _Optional[_Mapping[str, float]] = ..., addresses: _Optional[_Iterable[str]] = ..., attempt: _Optional[int] = ..., transfer_s: _Optional[float] = ..., donors: _Optional[_Iterable[_Union[PlanDonor, _Mapping]]] = ...) -> None: ...

class PlanDonor(_message.Message):
    __slots__ = ("replica_id", "share", "bytes", "state")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    share: float
    bytes: int
    state: str
    def __init__(self, replica_id: _Optional[str] = ..., share: _Optional[float] = ..., bytes: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("coordinator_id", "uptime_s", "replicas", "active", "recent", "next_page_token")
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    uptime_s: float
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    active: _containers.RepeatedCompositeFieldContainer[PlanStatus]
    recent: _containers.RepeatedCompositeFieldContainer[PlanStatus]
    next_page_token: str
    def __init__(self, coordinator_id: _Optional[str] = ..., uptime_s: _Optional[float] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., active: _Optional[_Iterable[_Union[PlanStatus, _Mapping]]] = ..., recent: _Optional[_Iterable[_Union[PlanStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
