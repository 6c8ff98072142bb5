"""``recoveryd status``: the cluster as plain-text tables (replicas, ranks, transfers)."""

from __future__ import annotations

from collections.abc import Sequence

from recoveryd._format import human_bytes
from recoveryd.protocol import ClusterStatus, PlanSnapshot


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return out


def _step(step: int | None) -> str:
    return "-" if step is None else str(step)


def _donors(p: PlanSnapshot) -> str:
    """One donor's name, or a striped plan's donors with their shares (and the lost)."""
    if len(p.donors) <= 1:
        return p.donor
    return ",".join(
        f"{d.replica_id}:{d.share:.0%}" + ("(lost)" if d.state == "lost" else "") for d in p.donors
    )


def _stripe_rows(plans: Sequence[PlanSnapshot]) -> list[list[str]]:
    """One row per donor of each striped plan: its share, what it sent, how it ended."""
    return [
        [
            str(p.plan_id),
            d.replica_id,
            f"{d.share:.1%}",
            human_bytes(d.bytes) if d.bytes else "-",
            d.state or "-",
        ]
        for p in plans
        if len(p.donors) > 1
        for d in p.donors
    ]


def _plan_rows(plans: Sequence[PlanSnapshot]) -> list[list[str]]:
    rows = []
    for p in plans:
        rate = p.bytes / p.transfer_s / 1e9 if p.transfer_s > 0 and p.bytes else 0.0
        rows.append(
            [
                str(p.plan_id),
                p.joiner,
                _donors(p),
                _step(p.step),
                p.state + (f" ({p.reason})" if p.reason else ""),
                str(p.attempt),
                human_bytes(p.bytes) if p.bytes else "-",
                f"{p.transfer_s:.3f}" if p.transfer_s else "-",
                f"{rate:.2f}" if rate else "-",
                f"{p.recovery_s:.3f}" if p.recovery_s else f"{p.age_s:.1f} (age)",
                ",".join(p.addresses) or "-",
            ]
        )
    return rows


def render(status: ClusterStatus) -> str:
    """The whole status as text."""
    lines = [
        f"coordinator {status.coordinator_id}, up {status.uptime_s:.0f} s, "
        f"{len(status.replicas)} replicas, {sum(len(r.ranks) for r in status.replicas)} ranks",
        "",
    ]
    rows = []
    for rep in status.replicas:
        for k in rep.ranks:
            rows.append(
                [
                    rep.replica_id,
                    rep.state,
                    f"{k.group_rank}/{rep.world_size}",
                    _step(k.step),
                    "yes" if k.healthy else "NO",
                    f"{k.last_seen_s:.1f}s",
                    k.device_kind,
                    f"{k.rendezvous} ({k.interface or '?'})",
                    ",".join(f"{a}={b}" for a, b in sorted(k.labels.items())) or "-",
                ]
            )
    lines += _table(
        [
            "REPLICA",
            "STATE",
            "RANK",
            "STEP",
            "HEALTHY",
            "SEEN",
            "DEVICE",
            "RENDEZVOUS (INTERFACE)",
            "LABELS",
        ],
        rows,
    )
    heads = [
        "PLAN",
        "JOINER",
        "DONOR(S)",
        "STEP",
        "STATE",
        "TRY",
        "BYTES",
        "XFER_S",
        "GB/S",
        "RECOVERY_S",
        "VIA",
    ]
    lines += ["", f"transfers in flight: {len(status.active)}"]
    if status.active:
        lines += _table(heads, _plan_rows(status.active))
    lines += ["", f"recent transfers: {len(status.recent)}"]
    if status.recent:
        lines += _table(heads, _plan_rows(status.recent))
    stripes = _stripe_rows([*status.active, *status.recent])
    if stripes:
        lines += ["", "stripes of striped plans:"]
        lines += _table(["PLAN", "DONOR", "SHARE", "SENT", "STATE"], stripes)
    return "\n".join(lines)
