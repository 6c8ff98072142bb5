"""One joiner, 1 vs 2 vs 3 donors on capped links; and a donor killed midway: resume vs restart.

Run (as root, where network namespaces can be made): ``python -m bench.striping_bench
[--quick] [--rate-mbit 400] [--repeats N]``. Every party is a process in its own
network namespace (:mod:`recoveryd.testing.netlab`); each donor's link is capped
by ``tc tbf`` at ``--rate-mbit``, the joiner's is not. The rounds are interleaved
(1, 2, 3 donors, then again), each an in-place striped receive
(:func:`recoveryd.transport.striped.recv_state_dict_striped`) of the same state.
Then, with 3 donors, the third is SIGKILLed halfway through its stripe (by
the link's rate; it is a fresh process, warmed by one untimed send first, as
the long-lived donors are): once
with resume (the survivors send its missing part at the same step), once
without (the receive fails; a restart would then pull everything from the 2
survivors, costed as the time to the failure plus the 2-donor time measured
in the same run). As in the agent, each donor hosts a store of its own and the
joiner watches each one (:class:`recoveryd.agent.liveness.StoreWatch`): a
donor's death resets that connection at once, where Gloo may not wake the
receive (``--no-watch``: only ``stall_timeout`` ends that wait). Ratios are against 1 donor and against the undisturbed
3-donor time of the same run. The last line reads
``striping: 2 donors Ax, 3 donors Bx, resume Cx``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import signal
import statistics
import sys
import threading
import time
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from recoveryd.agent.liveness import StoreWatch
from recoveryd.errors import TransferError
from recoveryd.testing import netlab
from recoveryd.transport import TransferConfig, send_state_dict
from recoveryd.transport.striped import recv_state_dict_striped

T = timedelta(seconds=300)
PORT = 29650
WATCH_PORT = 29651
"""Each donor's own store (its agent's), which the joiner watches; a killed donor of
round r hosts it at ``WATCH_PORT + 1 + r``."""
DONORS = ("d1", "d2", "d3")


def _pair(store: dist.Store, name: str, rank: int, host: str) -> dist.ProcessGroup:
    gloo: Any = dist.ProcessGroupGloo
    opts = gloo._Options()
    opts._timeout = T
    opts._devices = [gloo.create_device(hostname=host)]
    return gloo(dist.PrefixStore(name, store), rank, 2, opts)  # type: ignore[no-any-return]


def _state(mib: int, fill: float) -> dict[str, torch.Tensor]:
    n = mib * (1 << 20) // 4 // 16
    return {f"w{i}": torch.full((n,), fill + i) for i in range(16)}


BUCKET = 2 << 20
"""2 MiB messages: the stripes, and a dead donor's remainder, split evenly over the others."""


STALL_S = 5.0


def _config() -> TransferConfig:
    return TransferConfig(stall_timeout=timedelta(seconds=STALL_S), bucket_bytes=BUCKET)


def _donor(ns: str, k: int, host: str, joiner: str, mib: int, rounds: list[str], q: Any) -> None:
    """A donor taking part in ``rounds`` (``"n:mode"`` each, as the joiner schedules them)."""
    netlab.enter(ns)
    torch.set_num_threads(1)
    _own = dist.TCPStore(host, WATCH_PORT, None, True, T, wait_for_workers=False)  # watched
    store = dist.TCPStore(joiner, PORT, None, False, T)
    group = _pair(store, f"pair{k}", 0, host)
    state = _state(mib, 0.0)
    for r, spec in enumerate(rounds):
        n, mode = spec.split(":")
        store.get(f"round{r}")  # waits for the joiner to open the round
        if k < int(n) and mode != "skip":
            try:
                send_state_dict(group, [1], state, timeout=T, step=1, config=_config())
            except TransferError:  # a round without resume: the joiner gives up
                pass
            store.add(f"done{r}", 1)
    q.put(("donor", k, "finished"))
    _exit(q)  # its store stays open to the end


def _killed(ns: str, host: str, joiner: str, mib: int, r: int, after_s: float) -> None:
    """Donor 3 of a kill round: SIGKILLed ``after_s`` into its send (half its stripe's time)."""
    netlab.enter(ns)
    torch.set_num_threads(1)
    _own = dist.TCPStore(host, WATCH_PORT + 1 + r, None, True, T, wait_for_workers=False)
    store = dist.TCPStore(joiner, PORT, None, False, T)
    group = _pair(store, f"pair2-r{r}", 0, host)
    state = _state(mib, 0.0)
    # Warm, as the long-lived donors are: a fresh process's first send costs more (issue 14).
    store.get(f"warm{r}")
    send_state_dict(group, [1], state, timeout=T, step=1, config=_config())
    store.get(f"round{r}")
    timer = threading.Timer(after_s, lambda: os.kill(os.getpid(), signal.SIGKILL))
    timer.start()
    send_state_dict(group, [1], state, timeout=T, step=1, config=_config())
    _exit(None)  # not reached when the kill lands in time


def _joiner(
    ns: str, host: str, donors: list[str], mib: int, rounds: list[str], watch: bool, q: Any
) -> None:
    netlab.enter(ns)
    torch.set_num_threads(1)
    store = dist.TCPStore(host, PORT, None, True, T, wait_for_workers=False)
    groups = [_pair(store, f"pair{k}", 1, host) for k in range(len(DONORS))]
    theirs = [dist.TCPStore(d, WATCH_PORT, None, False, T) for d in donors]
    mine = _state(mib, 1000.0)
    want = _state(mib, 0.0)
    for r, spec in enumerate(rounds):
        n, mode = int(spec.split(":")[0]), spec.split(":")[1]
        pairs = groups[:n]
        stores = theirs[:n]
        if mode != "plain":  # a fresh third donor, killed midway
            pairs = [*groups[:2], _pair(store, f"pair2-r{r}", 1, host)]
            stores = [*theirs[:2], dist.TCPStore(donors[2], WATCH_PORT + 1 + r, None, False, T)]
            store.set(f"warm{r}", "1")  # untimed: the fresh donor's first send
            recv_state_dict_striped([(pairs[2], 0)], timeout=T, into=mine, step=1, config=_config())
        watches = [StoreWatch(s, "alive", f"d{k}") for k, s in enumerate(stores)] if watch else []
        for t in mine.values():
            t.fill_(-1.0)
        store.set(f"round{r}", "1")
        t0 = time.perf_counter()
        try:
            recv_state_dict_striped(
                [(g, 0) for g in pairs],
                timeout=T,
                into=mine,
                step=1,
                config=_config(),
                resume=mode == "resume",
                alive=watches or None,
            )
            ok = all(torch.equal(mine[k], want[k]) for k in want)
        except Exception as err:  # the receive without resume fails: that is measured
            ok = f"{type(err).__name__}"  # type: ignore[assignment]
        took = time.perf_counter() - t0
        for w in watches:
            w.close()
        q.put(("round", r, spec, took, ok))
        survivors = n if mode == "plain" else 2
        end = time.monotonic() + 60
        while survivors and store.add(f"done{r}", 0) < survivors and time.monotonic() < end:
            time.sleep(0.005)
    q.put(("joiner", 0, "finished"))
    _exit(q)


def _exit(q: Any | None) -> NoReturn:
    """Ends the process once the queue (if any) is flushed, without running the stores'
    destructors (a store server torn down under its clients' threads aborts the
    process with "terminate called without an active exception")."""
    if q is not None:
        q.close()
        q.join_thread()
    os._exit(0)


def _cpu() -> tuple[float, float]:
    """(the machine's non-idle CPU seconds, this process's and its reaped children's)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:8]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # not idle, not iowait
    own = sum(
        r.ru_utime + r.ru_stime
        for r in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )
    return busy, own


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, 3 repeats (< 3 min)")
    parser.add_argument("--rate-mbit", type=int, default=400, help="each donor's link cap")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--no-watch", action="store_true", help="no watch on the donors' stores (stall bound only)"
    )
    args = parser.parse_args()
    why = netlab.unavailable()
    if why is not None:
        print(f"striping bench: cannot run here: {why}", file=sys.stderr)
        return 2
    mib = 64 if args.quick else 256
    repeats = args.repeats or (3 if args.quick else 5)
    busy0, own0 = _cpu()
    wall0 = time.monotonic()
    plain = [f"{n}:plain" for _ in range(repeats) for n in (1, 2, 3)]
    kills = [m for _ in range(repeats) for m in ("3:resume", "3:fail")]
    rounds = plain + kills
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with netlab.NetLab(["j", *DONORS]) as lab:
        for d in DONORS:
            lab.cap(d, args.rate_mbit * 1_000_000, max_s=3600)
        jhost = lab.address("j")
        addrs = [lab.address(d) for d in DONORS]
        procs = [
            ctx.Process(
                target=_joiner,
                args=(lab.namespace("j"), jhost, addrs, mib, rounds, not args.no_watch, q),
            )
        ]
        for k, d in enumerate(DONORS):
            mine = [r if k < 2 or r.endswith("plain") else "0:skip" for r in rounds]
            procs.append(
                ctx.Process(
                    target=_donor,
                    args=(lab.namespace(d), k, lab.address(d), jhost, mib, mine, q),
                )
            )
        for p in procs:
            p.start()
        results: list[tuple[str, float, Any]] = []
        try:
            for r, spec in enumerate(rounds):
                if not spec.endswith("plain"):
                    # Halfway through its third, at the link's rate (the handshake aside).
                    after = mib * (1 << 20) * 8 / 3 / (args.rate_mbit * 1e6) / 2
                    killer = ctx.Process(
                        target=_killed,
                        args=(lab.namespace("d3"), lab.address("d3"), jhost, mib, r, after),
                    )
                    killer.start()
                msg = q.get(timeout=600)
                while msg[0] != "round":
                    msg = q.get(timeout=600)
                _, rr, got_spec, took, ok = msg
                results.append((got_spec, took, ok))
                print(f"round {rr:>2} {got_spec:<9} {took:7.3f} s  {ok}", flush=True)
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
    busy1, own1 = _cpu()
    # What other processes used: the machine's busy time less this bench's own (the
    # kernel's packet work on its behalf counts as others': an upper bound).
    foreign = max(0.0, (busy1 - busy0) - (own1 - own0))
    _report(
        results, mib, args.rate_mbit, repeats, foreign, time.monotonic() - wall0, not args.no_watch
    )
    return 0


def _report(
    results: list[tuple[str, float, Any]],
    mib: int,
    rate: int,
    repeats: int,
    foreign_s: float,
    wall_s: float,
    watch: bool,
) -> None:
    def times(spec: str) -> list[float]:
        return [t for s, t, ok in results if s == spec and (ok is True or spec == "3:fail")]

    link = mib * (1 << 20) * 8 / (rate * 1e6)
    med = {s: statistics.median(times(s)) for s in ("1:plain", "2:plain", "3:plain")}
    print(
        f"\nstriping: {mib} MiB in place, each donor's link capped at {rate} Mbit/s, "
        f"{repeats} repeats, interleaved, messages of {BUCKET >> 20} MiB"
    )
    print(f"CPU used outside this bench's processes: {foreign_s:.1f} s in {wall_s:.0f} s")
    if foreign_s > 0.15 * wall_s:
        print("NOTE: other processes (or the kernel's packet work) used the CPUs; rerun if high")
    print(f"{'donors':<8} {'min s':>8} {'median s':>9} {'x 1 donor':>10} {'x link limit':>13}")
    for n in (1, 2, 3):
        ts = times(f"{n}:plain")
        ideal = link / n
        print(
            f"{n:<8} {min(ts):>8.3f} {med[f'{n}:plain']:>9.3f} "
            f"{med['1:plain'] / med[f'{n}:plain']:>9.2f}x {ideal / med[f'{n}:plain']:>12.2f}x"
        )
    resumed = statistics.median(times("3:resume"))
    detect = statistics.median(times("3:fail"))
    restart = detect + med["2:plain"]
    print(
        f"one of 3 donors SIGKILLed halfway through its stripe ({len(times('3:resume'))} of "
        f"{repeats} resumed): resume {resumed:.3f} s; the receive without resume failed at "
        f"{detect:.3f} s, once every stream had ended ("
        + (
            "the death seen by the watch on its store"
            if watch
            else f"the death seen after stall_timeout {STALL_S:g} s: Gloo does not always wake "
            "a receive when its peer dies"
        )
        + f"); resume took {resumed - detect:.3f} s more; "
        f"a restart from the 2 survivors would take {restart:.3f} s; the floor, 5/6 of the "
        f"bytes over 2 links, is {1.25 * med['3:plain']:.3f} s (1.25x)"
    )
    print(
        f"striping: 2 donors {med['1:plain'] / med['2:plain']:.2f}x, 3 donors "
        f"{med['1:plain'] / med['3:plain']:.2f}x, resume {resumed / med['3:plain']:.2f}x "
        f"(restart {restart / med['3:plain']:.2f}x)"
    )


if __name__ == "__main__":
    os.environ.setdefault("RECOVERYD_LOG", "WARNING")
    sys.exit(main())
