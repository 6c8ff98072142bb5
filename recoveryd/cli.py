"""The ``recoveryd`` command.

``coordinator`` (serve the coordinator until SIGTERM), ``status`` (print the
cluster as the coordinator sees it), ``agent`` (the sidecar agent trainers
attach to), ``demo`` (kill and recover a replica of a small job on this
machine), ``example-trainer`` (the trainer the Kubernetes manifests run).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from recoveryd.errors import RecoverydError

if TYPE_CHECKING:
    from recoveryd.credentials import Credentials


def _add_credentials(p: argparse.ArgumentParser, *, server: bool) -> None:
    """The credential flags, the same on every command that talks to the coordinator."""
    g = p.add_argument_group(
        "credentials",
        "the job's token and/or TLS certificates (each flag defaults to its RECOVERYD_* "
        "variable); see the README's security section",
    )
    g.add_argument(
        "--token-file",
        default=None,
        help="file of job tokens, one per line: the first is sent, all are accepted "
        "(RECOVERYD_TOKEN_FILE)",
    )
    who = "the coordinator's server" if server else "this client's"
    g.add_argument(
        "--tls-cert", default=None, help=f"PEM certificate: {who} identity (RECOVERYD_TLS_CERT)"
    )
    g.add_argument("--tls-key", default=None, help="PEM key of --tls-cert (RECOVERYD_TLS_KEY)")
    g.add_argument(
        "--tls-ca",
        default=None,
        help=(
            "PEM CA that client certificates must chain to (mutual TLS; each certificate "
            "must name its replica)"
            if server
            else "PEM CA the coordinator's certificate must chain to"
        )
        + " (RECOVERYD_TLS_CA)",
    )
    if not server:
        g.add_argument(
            "--tls-server-name",
            default=None,
            help="name to check the coordinator's certificate against, when the address is "
            "not in it (RECOVERYD_TLS_SERVER_NAME)",
        )


def _credentials(args: argparse.Namespace) -> Credentials:
    from recoveryd.credentials import Credentials

    return Credentials.load(
        token_file=args.token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        tls_server_name=getattr(args, "tls_server_name", None),
    )


def _coordinator(args: argparse.Namespace) -> int:
    from recoveryd.coordinator.config import CoordinatorConfig
    from recoveryd.coordinator.server import Coordinator

    config = CoordinatorConfig(
        heartbeat_interval=timedelta(seconds=args.heartbeat_interval),
        heartbeat_timeout=timedelta(seconds=args.heartbeat_timeout),
        transfer_timeout=timedelta(seconds=args.transfer_timeout),
        fence_steps=args.fence_steps,
        max_donors=args.max_donors,
        warmup=timedelta(seconds=args.warmup),
        max_replicas=args.max_replicas,
        max_ranks=args.max_ranks,
    )
    metrics_port = None if args.metrics_port < 0 else args.metrics_port
    Coordinator(
        args.bind,
        config,
        metrics_port=metrics_port,
        credentials=_credentials(args),
        insecure=args.insecure,
        health_port=args.health_port,
    ).serve_forever(grace=timedelta(seconds=args.grace))
    return 0


def _status(args: argparse.Namespace) -> int:
    from recoveryd.agent.client import CoordinatorClient
    from recoveryd.status import render

    client = CoordinatorClient(
        args.coordinator, timeout=timedelta(seconds=args.timeout), credentials=_credentials(args)
    )
    try:
        print(render(client.status(recent=args.recent)))
    finally:
        client.close()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from recoveryd.demo.run import DemoConfig, run_demo

    return run_demo(
        DemoConfig(
            replicas=args.replicas,
            ranks=args.ranks,
            steps=args.steps,
            kill_at=args.kill_at,
            hidden=args.hidden,
            extra_bytes=args.extra_mib << 20,
            prometheus_sd=args.prometheus_sd,
            linger_s=args.linger,
            sidecars=args.sidecar,
            model=args.model,
        ),
        as_json=args.json,
    )


def _agent(args: argparse.Namespace) -> int:
    from recoveryd._time import env_int
    from recoveryd.sidecar.server import Sidecar, SidecarConfig

    port = (
        args.metrics_port
        if args.metrics_port is not None
        else env_int("RECOVERYD_METRICS_PORT", None, what="an integer (a port number)")
    )
    config = SidecarConfig.from_flags(
        coordinator=args.coordinator,
        socket_path=args.socket,
        metrics_port=port,
        host=args.host,
        credentials=_credentials(args),
        token_file=args.attach_token_file,
        allowed_uids=args.allowed_uids,
        max_sessions=args.max_sessions,
        attach_timeout=args.attach_timeout,
        idle_timeout=args.idle_timeout,
        max_frame_bytes=args.max_frame_bytes,
        require_sealed=args.require_sealed,
    )
    sidecar = Sidecar(config)

    def stop(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("signal %d: detaching trainers", signum)
        threading.Thread(target=sidecar.close, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    if args.parent_pid is not None:
        parent = args.parent_pid

        def orphaned() -> None:
            while True:
                time.sleep(0.5)
                try:
                    os.kill(parent, 0)
                except ProcessLookupError:
                    logging.getLogger(__name__).info("parent %d gone: detaching trainers", parent)
                    sidecar.close()
                    return

        threading.Thread(target=orphaned, daemon=True).start()
    try:
        sidecar.serve_forever()
    finally:
        sidecar.close()
    return 0


def _example_trainer(args: argparse.Namespace) -> int:
    from recoveryd.demo.standalone import main as run

    return run()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recoveryd`` command."""
    parser = argparse.ArgumentParser(
        prog="recoveryd", description="Live-peer state recovery for large PyTorch training jobs."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("coordinator", help="run the coordinator (gRPC) until SIGTERM")
    p.add_argument(
        "--bind", default="0.0.0.0:29400", help="HOST:PORT to listen on (default 0.0.0.0:29400)"
    )
    p.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("--heartbeat-timeout", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument(
        "--transfer-timeout",
        type=float,
        default=600.0,
        help="seconds a plan may take (default 600)",
    )
    p.add_argument(
        "--fence-steps", type=int, default=2, help="steps past the furthest donor rank (default 2)"
    )
    p.add_argument(
        "--max-donors",
        type=int,
        default=1,
        help="donor replicas one recovery may stripe over, each sending a part of the "
        "state (default 1; 2-3 add their links together, see the README)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds after start during which joiners wait for agents to register again "
        "instead of hearing 'no donor' (default 5)",
    )
    p.add_argument(
        "--grace", type=float, default=5.0, help="seconds in-flight RPCs get on SIGTERM (default 5)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        help="serve Prometheus /metrics on this port of the bind host (default 9400; -1: off)",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="also serve grpc.health.v1 alone, in plaintext, on this port (for Kubernetes' "
        "gRPC probes when the API speaks TLS; default: off)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback --bind without credentials (refused otherwise): anyone "
        "who reaches the port then steers every replica's recovery",
    )
    p.add_argument(
        "--max-replicas", type=int, default=4096, help="replicas registered at once (default 4096)"
    )
    p.add_argument(
        "--max-ranks", type=int, default=32768, help="ranks registered at once (default 32768)"
    )
    _add_credentials(p, server=True)
    p.set_defaults(fn=_coordinator)

    p = sub.add_parser("status", help="print the cluster as the coordinator sees it")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--recent", type=int, default=10, help="finished transfers to show (default 10)")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )
    _add_credentials(p, server=False)
    p.set_defaults(fn=_status)

    p = sub.add_parser(
        "demo", help="kill and recover a replica of a small training job on this machine"
    )
    p.add_argument("--replicas", type=int, default=3, help="replicas (default 3)")
    p.add_argument("--ranks", type=int, default=2, help="ranks per replica")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--kill-at", type=int, default=60, help="kill the last replica at this step")
    p.add_argument("--hidden", type=int, default=512, help="MLP width")
    p.add_argument("--extra-mib", type=int, default=0, help="extra MiB of state per rank")
    p.add_argument(
        "--json", action="store_true", help="print a JSON summary instead of the timeline"
    )
    p.add_argument(
        "--prometheus-sd",
        metavar="FILE",
        help="serve /metrics on the coordinator and every rank and write their addresses to "
        "FILE as Prometheus file_sd_configs targets",
    )
    p.add_argument(
        "--model",
        choices=("mlp", "fsdp2"),
        default="mlp",
        help="mlp: data parallel, plain tensors (default); fsdp2: each replica shards the MLP "
        "over its ranks with FSDP2 and AdamW, so the state is DTensors",
    )
    p.add_argument(
        "--sidecar",
        action="store_true",
        help="run each rank's agent as a sidecar process the rank attaches to",
    )
    p.add_argument(
        "--linger",
        type=float,
        default=0.0,
        help="seconds to keep everything up after training ends (default 0)",
    )
    p.set_defaults(fn=_demo)

    p = sub.add_parser(
        "agent",
        help="run the agent as a sidecar: trainers attach over a Unix socket "
        "(recoveryd.attach) and share their tensors with it",
    )
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--socket", required=True, help="Unix socket path trainers attach to")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics on this port (default: off; RECOVERYD_METRICS_PORT)",
    )
    p.add_argument(
        "--host",
        default=None,
        help="address peers reach transfers at (default: RECOVERYD_HOST, else the "
        "interface that routes to the coordinator)",
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process is gone (for launchers such as the demo)",
    )
    g = p.add_argument_group(
        "trainers", "who may attach, and how much they may ask (each defaults to its variable)"
    )
    g.add_argument(
        "--attach-token-file",
        default=None,
        help="file of the token trainers must present to attach (default: "
        "RECOVERYD_SIDECAR_TOKEN_FILE, else a new token written to SOCKET.token, mode 0600)",
    )
    g.add_argument(
        "--allowed-uids",
        default=None,
        help="uids besides the sidecar's own allowed to attach, comma-separated (default: "
        "RECOVERYD_SIDECAR_ALLOWED_UIDS, else none)",
    )
    g.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        help="connections served at once (default: RECOVERYD_SIDECAR_MAX_SESSIONS, else 64)",
    )
    g.add_argument(
        "--attach-timeout",
        type=float,
        default=None,
        help="seconds a new connection has to attach (default: "
        "RECOVERYD_SIDECAR_ATTACH_TIMEOUT, else 5)",
    )
    g.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="seconds an attached session may stay silent (default: "
        "RECOVERYD_SIDECAR_IDLE_TIMEOUT, else 120)",
    )
    g.add_argument(
        "--max-frame-bytes",
        type=int,
        default=None,
        help="largest state description a trainer may send (default: "
        "RECOVERYD_SIDECAR_MAX_FRAME_BYTES, else 256 MiB)",
    )
    g.add_argument(
        "--require-sealed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="map only shared memory sealed against shrinking (default: "
        "RECOVERYD_SIDECAR_REQUIRE_SEALED, else on)",
    )
    _add_credentials(p, server=False)
    p.set_defaults(fn=_agent)

    p = sub.add_parser(
        "example-trainer",
        help="train a small MLP with an embedded agent, configured by RECOVERYD_* "
        "environment variables (what deploy/k8s runs)",
    )
    p.set_defaults(fn=_example_trainer)

    args = parser.parse_args(argv)
    level = "WARNING" if args.command == "demo" and args.log_level == "INFO" else args.log_level
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.fn(args))
    except RecoverydError as err:
        print(f"recoveryd {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
