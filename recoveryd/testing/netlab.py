"""Real links for fault tests: network namespaces joined by a router, and faults on the links.

Each party (a replica, the coordinator) lives in its own network namespace
with one veth link to a hub namespace that routes between them. Every fault
is applied in the hub, so the parties' own stacks stay untouched and a fault
between two parties is a rule on the router:

- blackhole: nftables drops the packets (no reset, no ICMP): TCP on both
  ends sees silence;
- reset: nftables answers TCP with a reset (a crashed peer's kernel would);
- loss: nftables drops a random share of the packets;
- bandwidth cap: ``tc tbf`` on both directions of the party's link;
- delay and jitter: ``tc netem`` where the kernel has it, else a userspace
  proxy in the hub that every TCP connection of the party is redirected
  through (:mod:`recoveryd.testing.delayproxy`);
- clock skew: libfaketime, preloaded into one process
  (:func:`recoveryd.testing.clock.faketime_env`).

Needs root, ``ip``, ``nft`` and ``tc``; :func:`unavailable` says why a
machine cannot. Every fault expires on its own (``max_s``), and
:meth:`NetLab.close` deletes the namespaces, which takes their links and
rules with them; namespaces left by a killed run are removed the next time a
lab starts.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

_NS_DIR = "/run/netns"
_PREFIX = "rdl-"
_CLONE_NEWNET = 0x40000000
_NAME = re.compile(r"[a-z][a-z0-9]{0,7}")
_TABLE = "rdlab"
_CMD_TIMEOUT_S = 20.0
_RESET = "rdlab-reset"
_SUBNET = "10.213.0.0/16"


class NetLabError(RuntimeError):
    """A namespace, link or rule could not be made."""


def unavailable() -> str | None:
    """Why this machine cannot run a lab (``None``: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (scripts/tools.sh installs iproute2 and nftables)"
    probe = f"{_PREFIX}probe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "netns", "exec", probe, "nft", "add", "table", "inet", "probe"])
    except NetLabError as err:
        return f"cannot make a network namespace with nftables here: {err}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def enter(namespace: str) -> None:
    """Moves the calling thread (and the threads it starts later) into ``namespace``.

    Call it first thing in a child process, before any socket or thread exists.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(_NS_DIR, namespace), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetLabError(f"setns({namespace}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_CMD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise NetLabError(f"`{' '.join(argv)}` did not finish in {_CMD_TIMEOUT_S:g} s") from err
    if done.returncode != 0:
        raise NetLabError(f"`{' '.join(argv)}` failed: {done.stderr.strip()[:500]}")
    return done.stdout


def _reap_stale() -> None:
    """Deletes namespaces of labs whose process is gone (a killed test run)."""
    for path in glob.glob(os.path.join(_NS_DIR, f"{_PREFIX}*")):
        m = re.match(rf"{_PREFIX}(\d+)-", os.path.basename(path))
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            subprocess.run(["ip", "netns", "del", os.path.basename(path)], check=False)
        except PermissionError:
            pass


@dataclass(frozen=True)
class Fault:
    """One fault in force; :meth:`NetLab.clear` (or its expiry) lifts it."""

    fault_id: int
    what: str


class NetLab:
    """Parties in their own namespaces, joined through a routing hub.

    Args:
        parties: names (a lowercase letter, then up to 7 letters or digits).

    Raises:
        NetLabError: the namespaces or links could not be made (the lab is
            torn down again).
    """

    def __init__(self, parties: Sequence[str]) -> None:
        for name in parties:
            if not _NAME.fullmatch(name) or name == "hub":
                raise ValueError(f"party name {name!r}: a lowercase letter, then 7 letters/digits")
        if len(set(parties)) != len(parties) or not 2 <= len(parties) <= 200:
            raise ValueError(f"parties must be 2 to 200 distinct names, got {list(parties)}")
        _reap_stale()
        self.parties = list(parties)
        self._tag = f"{_PREFIX}{os.getpid()}-{next(_LABS)}"
        self.hub = f"{self._tag}-hub"
        self._index = {name: i + 1 for i, name in enumerate(parties)}
        self._lock = threading.Lock()
        self._faults: dict[int, tuple[str, list[str], list[str], list[str]]] = {}
        """id -> (what, forward rules, nat rules, tc commands to undo)."""
        self._ids = itertools.count(1)
        self._timers: dict[int, threading.Timer] = {}
        self._proxies: dict[int, subprocess.Popen[bytes]] = {}
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ---- topology ---------------------------------------------------------------

    def namespace(self, party: str) -> str:
        """The party's namespace (for :func:`enter` or ``ip netns exec``)."""
        return f"{self._tag}-{party}" if party != "hub" else self.hub

    def address(self, party: str) -> str:
        """The party's IPv4 address."""
        return f"10.213.{self._index[party]}.2"

    def _hub_address(self, party: str) -> str:
        return f"10.213.{self._index[party]}.1"

    def _link(self, party: str) -> str:
        return f"h-{party}"

    def _build(self) -> None:
        _run(["ip", "netns", "add", self.hub])
        self._made.append(self.hub)
        _run(["ip", "-n", self.hub, "link", "set", "lo", "up"])
        # Routes nowhere but between the parties; its ICMP errors are not rate-limited.
        for knob in ("net.ipv4.ip_forward=1", "net.ipv4.icmp_ratelimit=0"):
            _run(["ip", "netns", "exec", self.hub, "sysctl", "-q", "-w", knob])
        for party in self.parties:
            ns = self.namespace(party)
            _run(["ip", "netns", "add", ns])
            self._made.append(ns)
            link = self._link(party)
            peer = ["peer", "name", "eth0", "netns", ns]
            _run(["ip", "link", "add", link, "netns", self.hub, "type", "veth", *peer])
            _run(
                ["ip", "-n", self.hub, "addr", "add", f"{self._hub_address(party)}/24", "dev", link]
            )
            _run(["ip", "-n", self.hub, "link", "set", link, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(party)}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # The lab's addresses only, no default route: anything else (a DNS
            # query: c10d asks for the name of every store connection) fails at
            # once instead of waiting on the resolver's 5 s timeout.
            _run(["ip", "-n", ns, "route", "add", _SUBNET, "via", self._hub_address(party)])
        self._make_table()

    def popen(self, party: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Starts ``argv`` inside the party's namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespace(party), *argv], **kwargs)  # type: ignore[call-overload,no-any-return]

    # ---- faults -----------------------------------------------------------------

    def _pair(self, src: str, dst: str | None, *, both_ways: bool) -> list[str]:
        """nft matches for traffic from ``src`` (to ``dst``, or anywhere), and back."""
        a = f'iifname "{self._link(src)}"'
        b = f'oifname "{self._link(dst)}"' if dst is not None else ""
        out = [f"{a} {b}".strip()]
        if both_ways:
            back_in = f'iifname "{self._link(dst)}" ' if dst is not None else ""
            out.append(f'{back_in}oifname "{self._link(src)}"')
        return out

    def blackhole(
        self, src: str, dst: str | None = None, *, both_ways: bool = True, max_s: float = 120.0
    ) -> Fault:
        """Silently drops ``src``'s packets to ``dst`` (or to anyone), and back unless one-way."""
        rules = [f"{m} drop" for m in self._pair(src, dst, both_ways=both_ways)]
        arrow = "<->" if both_ways else "->"
        return self._add(f"blackhole {src}{arrow}{dst or '*'}", rules, [], [], max_s)

    def reset(self, src: str, dst: str | None = None, *, max_s: float = 120.0) -> Fault:
        """Answers TCP between ``src`` and ``dst`` (or anyone) with resets; drops the rest."""
        rules = []
        for m in self._pair(src, dst, both_ways=True):
            rules += [
                f'{m} meta l4proto tcp reject with tcp reset comment "{_RESET}"',
                f'{m} drop comment "{_RESET}"',
            ]
        return self._add(f"reset {src}<->{dst or '*'}", rules, [], [], max_s)

    def loss(self, party: str, percent: float, *, max_s: float = 120.0) -> Fault:
        """Drops ``percent`` of the party's packets, each way, at random."""
        if not 0 < percent < 100:
            raise ValueError(f"percent must be in (0, 100), got {percent}")
        per_mille = round(percent * 10)
        rules = [
            f"{m} numgen random mod 1000 < {per_mille} drop"
            for m in self._pair(party, None, both_ways=True)
        ]
        return self._add(f"loss {percent:g}% {party}", rules, [], [], max_s)

    def cap(self, party: str, bits_per_s: int, *, max_s: float = 120.0) -> Fault:
        """Caps the party's link at ``bits_per_s`` in each direction (``tc tbf``).

        One cap per party: a second replaces the first, and clearing either lifts it.
        """
        burst = max(64 * 1024, bits_per_s // 8 // 100)
        undo = []
        for ns, dev in ((self.hub, self._link(party)), (self.namespace(party), "eth0")):
            tbf = ["tbf", "rate", f"{bits_per_s}bit", "burst", str(burst), "latency", "400ms"]
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *tbf])
            undo.append(f"{ns} {dev}")
        return self._add(f"cap {party} {bits_per_s / 1e6:g} Mbit/s", [], [], undo, max_s)

    def delay(
        self, party: str, delay_ms: float, *, jitter_ms: float = 0.0, max_s: float = 120.0
    ) -> Fault:
        """Delays every TCP byte to and from the party by ``delay_ms`` (plus up to ``jitter_ms``).

        Uses a userspace proxy in the hub (order kept, TCP's own loss recovery
        underneath): this kernel's netem is not relied on. What a proxy
        changes besides the delay: a connection is accepted before the proxy
        connects onward (a refused port looks like a connection then closed),
        a reset arrives as a close, the far side sees the hub's address, a
        pair fault naming two links does not reach relayed bytes, and
        clearing the delay drops the connections it relays.
        """
        fid = next(self._ids)
        port = 40000 + fid
        argv = [sys.executable, "-m", "recoveryd.testing.delayproxy", "--port", str(port)]
        argv += ["--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms), "--max-s", str(max_s)]
        proxy = self.popen("hub", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proxy.stdout is not None
        ready = proxy.stdout.readline().decode().strip()
        if ready != "ready":
            proxy.kill()
            proxy.wait(5)
            raise NetLabError(f"the delay proxy did not start: {ready!r}")
        self._proxies[fid] = proxy
        addr = self.address(party)
        nat = [
            f'iifname "{self._link(party)}" meta l4proto tcp redirect to :{port}',
            f"ip daddr {addr} meta l4proto tcp redirect to :{port}",
        ]
        what = f"delay {party} {delay_ms:g}+{jitter_ms:g} ms"
        return self._add(what, [], nat, [], max_s, fid=fid)

    def _add(
        self,
        what: str,
        rules: list[str],
        nat: list[str],
        undo_tc: list[str],
        max_s: float,
        *,
        fid: int | None = None,
    ) -> Fault:
        fid = fid if fid is not None else next(self._ids)
        with self._lock:
            self._faults[fid] = (what, rules, nat, undo_tc)
            self._apply()
        timer = threading.Timer(max_s, self.clear, args=(Fault(fid, what),))
        timer.daemon = True
        timer.start()
        self._timers[fid] = timer
        return Fault(fid, what)

    def clear(self, fault: Fault | None = None) -> None:
        """Lifts one fault, or every fault."""
        with self._lock:
            ids = [fault.fault_id] if fault is not None else list(self._faults)
            for fid in ids:
                entry = self._faults.pop(fid, None)
                timer = self._timers.pop(fid, None)
                if timer is not None:
                    timer.cancel()
                proxy = self._proxies.pop(fid, None)
                if proxy is not None:
                    proxy.kill()
                    proxy.wait(5)
                if entry is None:
                    continue
                for spec in entry[3]:
                    ns, dev = spec.split()
                    argv = ["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"]
                    subprocess.run(argv, capture_output=True, check=False, timeout=_CMD_TIMEOUT_S)
            if os.path.exists(os.path.join(_NS_DIR, self.hub)):
                self._apply()

    def _apply(self) -> None:
        """Rewrites the hub's fault rules at once from the faults in force.

        Drops go in the forward hook, and in input/output too for what a delay
        proxy in the hub relays (a rule naming one link only). The counters'
        chain is made once and never rewritten.
        """
        fwd = [r for f in self._faults.values() for r in f[1]]
        nat = [r for f in self._faults.values() for r in f[2]]
        chains = {
            "c_forward": fwd,
            "c_input": [r for r in fwd if "oifname" not in r],
            # Not a reset's rules: the hub's own resets leave through the output hook.
            "c_output": [r for r in fwd if "iifname" not in r and _RESET not in r],
            "c_pre": nat,
        }
        lines = []
        for chain, rules in chains.items():
            lines.append(f"flush chain inet {_TABLE} {chain}")
            lines += [f"add rule inet {_TABLE} {chain} {r}" for r in rules]
        _run(["ip", "netns", "exec", self.hub, "nft", "-f", "-"], stdin="\n".join(lines) + "\n")

    def _make_table(self) -> None:
        count = [
            f'iifname "{self._link(a)}" oifname "{self._link(b)}" counter'
            for a in self.parties
            for b in self.parties
            if a != b
        ]
        hooks = {
            "c_count": "type filter hook forward priority -10",
            "c_forward": "type filter hook forward priority 0",
            "c_input": "type filter hook input priority 0",
            "c_output": "type filter hook output priority 0",
            "c_pre": "type nat hook prerouting priority -100",
        }
        lines = [f"table inet {_TABLE} {{"]
        for chain, hook in hooks.items():
            lines += [f"  chain {chain} {{", f"    {hook}; policy accept;"]
            lines += [f"    {r}" for r in (count if chain == "c_count" else [])]
            lines.append("  }")
        lines.append("}")
        _run(["ip", "netns", "exec", self.hub, "nft", "-f", "-"], stdin="\n".join(lines) + "\n")

    def traffic(self) -> dict[tuple[str, str], int]:
        """Bytes routed so far from each party to each other (not what a delay proxy relays)."""
        out = _run(
            [
                "ip",
                "netns",
                "exec",
                self.hub,
                "nft",
                "-j",
                "list",
                "chain",
                "inet",
                _TABLE,
                "c_count",
            ]
        )
        by_link = {self._link(p): p for p in self.parties}
        got: dict[tuple[str, str], int] = {}
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if rule is None:
                continue
            names = [e["match"]["right"] for e in rule["expr"] if "match" in e]
            counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
            got[(by_link[names[0]], by_link[names[1]])] = int(counter["bytes"])
        return got

    def wait_traffic(self, src: str, dst: str, at_least: int, *, timeout_s: float) -> float:
        """Waits until ``src`` sent ``dst`` at least ``at_least`` bytes; returns when (monotonic)."""
        end = time.monotonic() + timeout_s
        while True:
            if self.traffic().get((src, dst), 0) >= at_least:
                return time.monotonic()
            if time.monotonic() > end:
                raise NetLabError(f"{src} sent {dst} fewer than {at_least} bytes in {timeout_s} s")
            time.sleep(0.02)

    # ---- teardown ---------------------------------------------------------------

    def close(self) -> None:
        """Lifts every fault, stops the proxies and deletes the namespaces."""
        with self._lock:  # not while a fault's expiry rewrites the rules
            for timer in list(self._timers.values()):
                timer.cancel()
            self._timers.clear()
            self._faults.clear()
            for proxy in list(self._proxies.values()):
                proxy.kill()
                proxy.wait(5)
            self._proxies.clear()
            for ns in reversed(self._made):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            self._made.clear()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LABS = itertools.count()
