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
import statistics
from collections.abc import Iterable
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
    """Best joiner time over every repeat of every round."""
    median_seconds: float | None = None
    """Median over the rounds of each round's best."""
    first_seconds: float | None = None
    """Joiner time of the first repeat (a fresh process's first transfer, as in a real heal);
    the median over the rounds."""
    first_min: float | None = None
    """The fastest first repeat of the rounds."""
    rounds: int = 1
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
    row.seconds = row.median_seconds = float(rr["seconds"])
    row.first_seconds = row.first_min = float(receiver["repeats"][0]["seconds"])
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


def merge_rounds(rounds: list[Row]) -> Row:
    """One row from the same pair's rows of several rounds (each its own fresh processes):
    best of all, median of the rounds' bests, median and best of their first calls; memory
    and other processes' CPU share at their worst; notes of every round."""
    ok = [r for r in rounds if r.status == "ok" and r.seconds is not None]
    bad = [r for r in rounds if r.status in ("FAIL", "error")]
    base = min(ok, key=lambda r: r.seconds or 0.0) if ok else (bad or rounds)[0]
    out = dataclasses.replace(base, notes=[], extras=dict(base.extras), rounds=len(rounds))
    if bad:
        out.status = bad[0].status
    for r in rounds:
        out.notes.extend(n for n in r.notes if n not in out.notes)
    if ok:
        out.median_seconds = statistics.median(r.seconds or 0.0 for r in ok)
        firsts = [r.first_seconds for r in ok if r.first_seconds is not None]
        if firsts:
            out.first_seconds = statistics.median(firsts)
            out.first_min = min(firsts)
        out.sender_extra_bytes = _worst(r.sender_extra_bytes for r in ok)
        out.receiver_extra_bytes = _worst(r.receiver_extra_bytes for r in ok)
    out.foreign_cpu_share = _worst(r.foreign_cpu_share for r in rounds)
    return out


def _worst(values: Iterable[float | int | None]) -> Any:
    known = [v for v in values if v is not None]
    return max(known) if known else None


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
        "best s",
        "med s",
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
                "-" if r.median_seconds is None else f"{r.median_seconds:.3f}",
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
    return _aligned(lines)


def _aligned(lines: list[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell (the first two left, the rest right), the last
    one free; a rule under the head."""
    head = lines[0]
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
best s   joiner wall time: barrier, then start of recv -> recv returned (best of every repeat
         of every round; each round runs every pair again in fresh processes, interleaved)
med s    the median over the rounds of each round's best
1st s    the same for the first repeat: the first transfer of two fresh processes, as in a real
         heal (the median over the rounds)
GB/s     logical tensor bytes / best s / 1e9
x raw    raw-gloo time on the same workload in this run / best s (1.00 = the ProcessGroup limit,
         receiving into a preallocated, already touched buffer)
x fresh  raw-gloo-fresh time on the same workload in this run / best s (1.00 = the limit for a
         receiver that allocates: one pg.recv into torch.empty(total bytes) allocated inside the
         timed region, so first-touch page faults are paid); blank on in-place workloads (E, F)
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


def render_first_calls(rows: list[Row]) -> str:
    """The first-call table: each pair's first transfer (fresh processes) against its best."""
    anchors = {r.workload: r for r in rows if r.transport == ANCHOR}
    fresh = {r.workload: r for r in rows if r.transport == FRESH_ANCHOR}
    lines: list[tuple[str, ...]] = [
        ("wl", "transport", "1st s", "1st min", "best s", "1st/best", "anchor 1st/best", "")
    ]
    for r in rows:
        if r.status != "ok" or not r.seconds or r.first_seconds is None:
            continue
        a = anchors.get(r.workload) if r.in_place else fresh.get(r.workload)
        ratio = (
            f"{a.first_seconds / a.seconds:.2f} ({a.transport})"
            if a is not None and a.seconds and a.first_seconds is not None
            else "-"
        )
        lines.append(
            (
                r.workload,
                r.transport,
                f"{r.first_seconds:.3f}",
                "-" if r.first_min is None else f"{r.first_min:.3f}",
                f"{r.seconds:.3f}",
                f"{r.first_seconds / r.seconds:.2f}",
                ratio,
                "",
            )
        )
    return _aligned(lines)


FIRST_CALL_LEGEND = """\
1st s           the first transfer of fresh processes (median over the rounds); 1st min: the
                fastest of them; best s: the best of every repeat
1st/best        how much a real heal's first transfer costs over the best case
anchor 1st/best the same for the anchor that holds the same memory: raw-gloo-fresh (recv into
                memory allocated in the timed region) for allocating workloads, raw-gloo
                (a preallocated, touched buffer) for in-place ones"""

_ANCHOR_TRANSPORTS = ("torch-pg", "torchft-pg", "torchft-http")


def targets(rows: list[Row], workloads: dict[str, Workload]) -> list[Target]:
    """recoveryd's targets (issue 14) evaluated on this run's rows."""
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

    def add(wl: str, text: str, measured: str | None, met: bool | None) -> None:
        out.append(Target(workload=wl, text=text, measured=measured or why_not(wl), met=met))

    for wl, floor in (("A", 0.80), ("B", 0.70), ("E", 0.97)):
        if wl not in workloads:
            continue
        r = rd(wl)
        text = f"throughput >= {floor:.2f}x raw-gloo"
        if r is None or r.ratio is None:
            add(wl, text, None, None)
        else:
            add(wl, text, f"{r.ratio:.2f}x", r.ratio >= floor)
    if "E" in workloads and (r := rd("E")) is not None and r.seconds:
        others = [
            o
            for t in _ANCHOR_TRANSPORTS
            if (o := by.get(("E", t))) and o.status == "ok" and o.seconds
        ]
        text = "time <= the best reference transport's"
        if others:
            best = min(others, key=lambda o: o.seconds or 0.0)
            assert best.seconds is not None
            add(
                "E",
                text,
                f"{r.seconds:.3f} s vs {best.transport} {best.seconds:.3f} s",
                r.seconds <= best.seconds,
            )
        else:
            add("E", text, "no reference transport ran", None)
    for wl in ("A", "B", "E"):
        if wl not in workloads:
            continue
        r = rd(wl)
        text = "first call <= 1.3x best"
        if r is None or r.first_seconds is None or not r.seconds:
            add(wl, text, None, None)
        else:
            ratio = r.first_seconds / r.seconds
            add(wl, text, f"{ratio:.2f}x ({r.first_seconds:.3f} s)", ratio <= 1.3)
    for wl in ("C", "F"):
        if wl not in workloads:
            continue
        r = rd(wl)
        for text, value, limit in (
            ("repeated layout: best <= 0.150 s", None if r is None else r.seconds, 0.15),
            ("first layout: first call <= 0.300 s", None if r is None else r.first_seconds, 0.3),
        ):
            if value is None:
                add(wl, text, None, None)
            else:
                add(wl, text, f"{value:.3f} s", value <= limit)
        warmed = by.get((wl, "recoveryd-warmed"))
        if warmed is not None and warmed.status == "ok" and warmed.first_seconds is not None:
            first = warmed.first_seconds
            add(
                wl,
                "first layout, donor plan made ahead (as an agent does): first call <= 0.300 s",
                f"{first:.3f} s",
                first <= 0.3,
            )
    if "D" in workloads:
        r = rd("D")
        w = workloads["D"]
        text = f"wire = logical ({fmt_bytes(w.logical_bytes)}, +{_D_WIRE_SLACK:.0%} headers) and time <= 1.2x raw-gloo"
        base = raw.get("D")
        if r is None or r.seconds is None or r.wire_bytes is None:
            add("D", text, None, None)
        elif base is None or base.seconds is None:
            add("D", text, "raw-gloo did not run", None)
        else:
            wire_ok = w.logical_bytes <= r.wire_bytes <= w.logical_bytes * (1 + _D_WIRE_SLACK)
            rel = r.seconds / base.seconds
            add(
                "D",
                text,
                f"wire {r.wire_bytes:,} B ({r.wire_bytes / w.logical_bytes:.4f}x), time {rel:.2f}x raw",
                wire_ok and rel <= 1.2,
            )
    order = {n: i for i, n in enumerate("ABCDEF")}
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
