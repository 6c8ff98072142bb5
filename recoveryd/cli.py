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

from recoveryd.errors import RecoverydError


def _coordinator(args: argparse.Namespace) -> int:
    from recoveryd.coordinator.config import CoordinatorConfig
    from recoveryd.coordinator.server import Coordinator

    config = CoordinatorConfig(
        heartbeat_interval=timedelta(seconds=args.heartbeat_interval),
        heartbeat_timeout=timedelta(seconds=args.heartbeat_timeout),
        transfer_timeout=timedelta(seconds=args.transfer_timeout),
        fence_steps=args.fence_steps,
        warmup=timedelta(seconds=args.warmup),
    )
    metrics_port = None if args.metrics_port < 0 else args.metrics_port
    Coordinator(args.bind, config, metrics_port=metrics_port).serve_forever(
        grace=timedelta(seconds=args.grace)
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from recoveryd.agent.client import CoordinatorClient
    from recoveryd.status import render

    client = CoordinatorClient(args.coordinator, timeout=timedelta(seconds=args.timeout))
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
    config = SidecarConfig(
        coordinator=args.coordinator,
        socket_path=args.socket,
        metrics_port=port,
        **({"host": args.host} if args.host is not None else {}),
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
    p.set_defaults(fn=_coordinator)

    p = sub.add_parser("status", help="print the cluster as the coordinator sees it")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    p.add_argument("--recent", type=int, default=10, help="finished transfers to show (default 10)")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )
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
