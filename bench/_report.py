"""Turns pair outcomes into rows, the side-by-side table, recoveryd's targets and JSON.

Per pair the row takes the repeat with the best (lowest) joiner time; memory is the worst
(highest) over repeats. Definitions printed with the table:

* time: joiner wall time from the start of ``recv`` (right after a barrier) to ``recv`` returned.
* first: the same for the first repeat, i.e. the first transfer of fresh processes (a real heal).
* ratio (x raw): raw-gloo's time on the same workload in the same run / this time (1.0 = the
  ProcessGroup limit with a preallocated, touched receive buffer).
* fresh ratio (x fresh): raw-gloo-fresh's time on the same workload in the same run / this time
  (1.0 = the limit for a receiver that allocates); allocating workloads only.
* wire: bytes both ranks handed to ``pg.send`` (PG transports, via a counting proxy), or HTTP
  response bytes the joiner read (torchft-http).
* extra RSS: donor = peak RSS - baseline RSS; joiner = peak RSS - baseline RSS - bytes it
  legitimately retains (the logical tensor bytes for an allocating receive, 0 in place), i.e.
  the transient memory beyond the final state it holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bench._harness import PairOutcome
from bench._transports import ANCHOR, FRESH_ANCHOR
from bench._workloads import Workload

_KIB = 1024
_D_WIRE_SLACK = 0.01
BUSY_SHARE = 0.15
"""Above this share of the machine's CPU used by other processes, a pair's timings are flagged."""


@dataclass(kw_only=True, slots=True)
class Row:
    """One line of the table."""

    workload: str
    transport: str
    status: str
    """``ok``, ``FAIL``, ``skipped`` or ``error``."""
    seconds: float | None = None
    first_seconds: float | None = None
    """Joiner time of the first repeat (a fresh process's first transfer, as in a real heal)."""
    sender_seconds: float | None = None
    gbps: float | None = None
    ratio: float | None = None
    """raw-gloo's time / this time (same workload, same run)."""
    fresh_ratio: float | None = None
    """raw-gloo-fresh's time / this time; None on in-place workloads."""
    in_place: bool = False
    """The workload is received in place (so ``x fresh`` does not apply)."""
    wire_bytes: int | None = None
    sender_extra_bytes: int | None = None
    receiver_extra_bytes: int | None = None
    logical_bytes: int = 0
    foreign_cpu_share: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


def fmt_bytes(n: float | None, signed: bool = False) -> str:
    """1.00 GiB / 12.5 MiB / 3.0 KiB / 17 B."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ("+" if signed else "")
    v = abs(float(n))
    for unit, size in (("GiB", _KIB**3), ("MiB", _KIB**2), ("KiB", _KIB)):
        if v >= size:
            return f"{sign}{v / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{sign}{v:.0f} B"


def _best_repeat(receiver: dict[str, Any]) -> int:
    reps = receiver["repeats"]
    return min(range(len(reps)), key=lambda i: reps[i]["seconds"])


def build_row(o: PairOutcome, w: Workload) -> Row:
    """The table row for one outcome (ratio filled in later by :func:`fill_ratios`)."""
    row = Row(
        workload=o.workload,
        transport=o.transport,
        status="ok",
        logical_bytes=w.logical_bytes,
        in_place=w.in_place,
    )
    if o.status == "skipped":
        row.status = "skipped"
        row.notes.append(f"skipped ({o.reason})")
        return row
    sender, receiver = [*o.ranks, None, None][:2]
    if o.status != "ok" or sender is None or receiver is None or not receiver.get("repeats"):
        row.status = "error"
        row.notes.append(f"{o.status}: {o.reason or 'no result from a rank'}")
        return row

    if o.foreign_cpu_share is not None and o.foreign_cpu_share > BUSY_SHARE:
        row.notes.append(f"busy: other processes used {o.foreign_cpu_share:.0%} of the CPUs")
    b = _best_repeat(receiver)
    rr = receiver["repeats"][b]
    sr = sender["repeats"][b]
    row.seconds = float(rr["seconds"])
    row.first_seconds = float(receiver["repeats"][0]["seconds"])
    row.sender_seconds = float(sr["seconds"])
    row.gbps = w.logical_bytes / row.seconds / 1e9 if row.seconds > 0 else None

    rw, sw = rr["wire"], sr["wire"]
    if rw["source"] == "http":
        row.wire_bytes = int(rw["recv_bytes"])
        row.extras["http_server_written_bytes"] = int(sw["sent_bytes"])
    else:
        row.wire_bytes = int(sw["sent_bytes"]) + int(rw["sent_bytes"])
        if int(sw["sent_bytes"]) != int(rw["recv_bytes"]):
            row.notes.append(
                f"donor sent {fmt_bytes(sw['sent_bytes'])} but joiner posted "
                f"{fmt_bytes(rw['recv_bytes'])} of recv buffers"
            )
        uncounted = {**sw["uncounted_calls"], **rw["uncounted_calls"]}
        if uncounted:
            calls = ", ".join(f"{k}x{v}" for k, v in sorted(uncounted.items()))
            row.notes.append(f"wire count excludes {calls}")
    row.extras["messages"] = int(sw["messages"]) + int(rw["messages"])

    row.sender_extra_bytes = max(
        int(r["peak_rss"]) - int(r["baseline_rss"]) for r in sender["repeats"]
    )
    retained = int(receiver["retained_bytes"])
    row.receiver_extra_bytes = max(
        int(r["peak_rss"]) - int(r["baseline_rss"]) - retained for r in receiver["repeats"]
    )
    row.extras["receiver_final_minus_baseline_bytes"] = int(rr["final_rss"]) - int(
        rr["baseline_rss"]
    )
    row.extras["receiver_peak_source"] = rr["peak_source"]

    want = sender.get("sender_digest")
    bad = [i for i, r in enumerate(receiver["repeats"]) if r.get("digest") != want]
    if bad or want is None:
        row.status = "FAIL"
        row.notes.append(f"checksum mismatch in repeat(s) {bad}")
    if rr.get("in_place") is False and o.transport != ANCHOR:
        row.notes.append("not in place (returned tensors are not the joiner's)")
    if rr.get("extras", {}).get("emulated_in_place"):
        row.notes.append("in place emulated: recv + copy_")
    if w.kind == "views":
        row.notes.append(f"{rr.get('storages')} storage(s) on joiner")
    stats = {k: v for k, v in rr.get("extras", {}).items() if k.startswith("stats.")}
    sstats = {k: v for k, v in sr.get("extras", {}).items() if k.startswith("stats.")}
    if stats or sstats:
        row.extras["joiner_stats"] = stats
        row.extras["donor_stats"] = sstats
        if "stats.wire_bytes" in sstats and "stats.wire_bytes" in stats:
            row.notes.append(
                f"TransferStats.wire_bytes donor {sstats['stats.wire_bytes']:,} / "
                f"joiner {stats['stats.wire_bytes']:,}"
            )
    return row


def fill_ratios(rows: list[Row]) -> None:
    """Sets each row's ratio (vs raw-gloo) and, on allocating workloads, fresh_ratio (vs
    raw-gloo-fresh): the anchor's best time on the same workload / the row's best time."""

    def best(name: str) -> dict[str, float]:
        return {
            r.workload: r.seconds
            for r in rows
            if r.transport == name and r.status == "ok" and r.seconds
        }

    raw, fresh = best(ANCHOR), best(FRESH_ANCHOR)
    for r in rows:
        if not r.seconds:
            continue
        base = raw.get(r.workload)
        if base:
            r.ratio = base / r.seconds
        base = fresh.get(r.workload)
        if base and not r.in_place:
            r.fresh_ratio = base / r.seconds


def render_table(rows: list[Row]) -> str:
    """The side-by-side table."""
    head = (
        "wl",
        "transport",
        "time s",
        "1st s",
        "GB/s",
        "x raw",
        "x fresh",
        "wire",
        "donor +RSS",
        "joiner +RSS",
        "ok",
        "notes",
    )
    lines: list[tuple[str, ...]] = [head]
    for r in rows:
        ok = {"ok": "ok", "FAIL": "FAIL", "skipped": "-", "error": "FAIL"}[r.status]
        lines.append(
            (
                r.workload,
                r.transport,
                "-" if r.seconds is None else f"{r.seconds:.3f}",
                "-" if r.first_seconds is None else f"{r.first_seconds:.3f}",
                "-" if r.gbps is None else f"{r.gbps:.2f}",
                "-" if r.ratio is None else f"{r.ratio:.2f}",
                _fresh_cell(r),
                fmt_bytes(r.wire_bytes),
                fmt_bytes(r.sender_extra_bytes, signed=True),
                fmt_bytes(r.receiver_extra_bytes, signed=True),
                ok,
                "; ".join(r.notes),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    out = []
    for n, line in enumerate(lines):
        cells = [
            line[i].ljust(widths[i]) if i < 2 else line[i].rjust(widths[i])
            for i in range(len(widths))
        ]
        out.append("  ".join([*cells, line[-1]]).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def _fresh_cell(r: Row) -> str:
    if r.fresh_ratio is not None:
        return f"{r.fresh_ratio:.2f}"
    # In place: x fresh does not apply, so the cell stays blank rather than "-".
    return "" if r.in_place else "-"


LEGEND = """\
time s   joiner wall time: barrier, then start of recv -> recv returned (best of the repeats)
1st s    the same for the first repeat: the first transfer of two fresh processes, as in a real
         heal (equal to time s with 1 repeat)
GB/s     logical tensor bytes / time s / 1e9
x raw    raw-gloo time on the same workload in this run / time s (1.00 = the ProcessGroup limit,
         receiving into a preallocated, already touched buffer)
x fresh  raw-gloo-fresh time on the same workload in this run / time s (1.00 = the limit for a
         receiver that allocates: one pg.recv into torch.empty(total bytes) allocated inside the
         timed region, so first-touch page faults are paid); blank on in-place workloads (E)
wire     PG transports: sum of tensor nbytes both ranks passed to pg.send (counting proxy);
         torchft-http: HTTP response bytes the joiner read from its socket
+RSS     donor:  peak RSS - baseline RSS during the transfer
         joiner: peak RSS - baseline RSS - bytes retained (logical bytes if allocating, 0 in place)
         = transient memory beyond the final state held; worst of the repeats; peak from a 5 ms
         RSS sampler, or ru_maxrss when the process high-water mark grew during the transfer"""


@dataclass(kw_only=True, slots=True)
class Target:
    """One recoveryd target and whether this run met it."""

    workload: str
    text: str
    measured: str
    met: bool | None
    """None when recoveryd did not run on the workload."""


def targets(rows: list[Row], workloads: dict[str, Workload]) -> list[Target]:
    """recoveryd's targets evaluated on this run's rows."""
    by = {(r.workload, r.transport): r for r in rows}
    raw = {r.workload: r for r in rows if r.transport == ANCHOR}
    out: list[Target] = []

    def rd(wl: str) -> Row | None:
        r = by.get((wl, "recoveryd"))
        return r if r is not None and r.status == "ok" else None

    def why_not(wl: str) -> str:
        r = by.get((wl, "recoveryd"))
        if r is None:
            return "recoveryd not in this run"
        return "; ".join(r.notes) or r.status

    for wl, floor in (("A", 0.85), ("B", 0.85), ("E", 0.95)):
        if wl not in workloads:
            continue
        r = rd(wl)
        text = f"throughput >= {floor:.2f}x raw-gloo"
        if r is None or r.ratio is None:
            out.append(Target(workload=wl, text=text, measured=why_not(wl), met=None))
        else:
            out.append(
                Target(workload=wl, text=text, measured=f"{r.ratio:.2f}x", met=r.ratio >= floor)
            )
    if "C" in workloads:
        r = rd("C")
        text = "time <= 0.300 s"
        if r is None or r.seconds is None:
            out.append(Target(workload="C", text=text, measured=why_not("C"), met=None))
        else:
            out.append(
                Target(workload="C", text=text, measured=f"{r.seconds:.3f} s", met=r.seconds <= 0.3)
            )
    if "D" in workloads:
        r = rd("D")
        w = workloads["D"]
        text = f"wire = logical ({fmt_bytes(w.logical_bytes)}, +{_D_WIRE_SLACK:.0%} headers) and time <= 1.2x raw-gloo"
        base = raw.get("D")
        if r is None or r.seconds is None or r.wire_bytes is None:
            out.append(Target(workload="D", text=text, measured=why_not("D"), met=None))
        elif base is None or base.seconds is None:
            out.append(Target(workload="D", text=text, measured="raw-gloo did not run", met=None))
        else:
            wire_ok = w.logical_bytes <= r.wire_bytes <= w.logical_bytes * (1 + _D_WIRE_SLACK)
            rel = r.seconds / base.seconds
            out.append(
                Target(
                    workload="D",
                    text=text,
                    measured=f"wire {r.wire_bytes:,} B ({r.wire_bytes / w.logical_bytes:.4f}x), time {rel:.2f}x raw",
                    met=wire_ok and rel <= 1.2,
                )
            )
    order = {n: i for i, n in enumerate("ABCDE")}
    return sorted(out, key=lambda t: order.get(t.workload, 99))


def render_targets(ts: list[Target], quick: bool) -> str:
    """The targets block."""
    lines = [
        "recoveryd targets"
        + (" (defined at full size; --quick numbers are indicative)" if quick else "")
    ]
    for t in ts:
        verdict = {True: "met", False: "NOT MET", None: "n/a"}[t.met]
        lines.append(f"  {t.workload}  {t.text:<72}  {verdict:<7}  {t.measured}")
    return "\n".join(lines)


def render_noise(rows: list[Row]) -> str:
    """Lines that say how much to trust this run's timings (empty when nothing stands out)."""
    lines: list[str] = []
    busy = [r for r in rows if r.foreign_cpu_share is not None and r.foreign_cpu_share > BUSY_SHARE]
    if busy:
        worst = max(r.foreign_cpu_share or 0.0 for r in busy)
        lines.append(
            f"noise: {len(busy)} pair(s) ran while other processes used > {BUSY_SHARE:.0%} of the "
            f"CPUs (up to {worst:.0%}); their timings are unreliable"
        )
    for name in (ANCHOR, FRESH_ANCHOR):
        raw = {r.workload: r.seconds for r in rows if r.transport == name and r.seconds}
        a, e = raw.get("A"), raw.get("E")
        if a and e:
            spread = abs(a - e) / min(a, e)
            lines.append(
                f"noise: {name} on A and on E is the same transfer: {a:.3f} s vs {e:.3f} s "
                f"({spread:.0%} apart)"
            )
    return "\n".join(lines)
