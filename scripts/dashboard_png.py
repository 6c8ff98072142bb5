"""Renders the Grafana dashboard's panels to a PNG from real Prometheus data.

Runs a real Prometheus on 127.0.0.1, runs ``recoveryd demo`` a few times
under it (each with a bigger state, each killing and recovering a replica),
then evaluates every panel's queries exactly as written in
``deploy/grafana/dashboards/recoveryd.json`` (range queries for graphs,
instant queries for stats) and draws them on the dashboard's own grid with
matplotlib. No Grafana is needed; the picture is what the dashboard shows
for those runs.

    python scripts/dashboard_png.py --out deploy/grafana/dashboard.png
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from recoveryd.demo.run import DemoConfig, run_demo
from recoveryd.testing.prometheus import LocalPrometheus, grafana_to_promql

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "recoveryd.json"
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return sorted(out, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))


def _legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    for k, v in labels.items():
        fmt = fmt.replace("{{" + k + "}}", v).replace("{{ " + k + " }}", v)
    return fmt


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "bytes":
        for u in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or u == "TiB":
                return f"{value:.3g} {u}"
            value /= 1024
    if unit == "Bps":
        for u in ("B/s", "KB/s", "MB/s", "GB/s"):
            if abs(value) < 1000 or u == "GB/s":
                return f"{value:.3g} {u}"
            value /= 1000
    if unit == "s":
        return f"{value * 1000:.0f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "dateTimeFromNow":
        return f"{value:.0f} s ago"
    return f"{value:.4g}"


def render(prom: LocalPrometheus, start: float, end: float, out: Path) -> None:
    """Draws every panel of the dashboard for ``[start, end]`` into ``out``."""
    dashboard = json.loads(DASHBOARD.read_text())
    span = f"{max(60, int(end - start))}s"
    values = {"__rate_interval": "30s", "__range": span, "__interval": "2s"}
    panels = _panels(dashboard)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    scale = 0.42  # inches per grid unit of height; 24 columns span the width
    fig = plt.figure(figsize=(24, rows * scale))
    fig.suptitle(
        f"{dashboard['title']} - {len(panels)} panels from a real Prometheus scraping "
        "`recoveryd demo` runs",
        fontsize=14,
    )
    for p in panels:
        g = p["gridPos"]
        left, width = g["x"] / 24, g["w"] / 24
        bottom, height = 1 - (g["y"] + g["h"]) / rows, g["h"] / rows
        if p["type"] == "row":
            fig.text(left + 0.005, bottom + height * 0.3, p["title"], fontsize=13, weight="bold")
            continue
        ax = fig.add_axes((left + 0.025, bottom + 0.03 / rows * 8, width - 0.035, height * 0.72))
        ax.set_title(p["title"], fontsize=9, loc="left")
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        texts: list[str] = []
        for t in p.get("targets", []):
            expr = grafana_to_promql(t["expr"], values)
            if t.get("instant") or p["type"] in ("stat", "bargauge", "table", "gauge"):
                for s in prom.query(expr, end):
                    v = float(s["value"][1])
                    label = _legend(t.get("legendFormat", ""), s["metric"])
                    if unit == "dateTimeFromNow" or (p["type"] == "stat" and "time()" in expr):
                        texts.append(f"{label}: {_fmt(v, 's')} ago")
                    else:
                        texts.append(f"{label}: {_fmt(v, unit)}")
                continue
            for s in prom.query_range(expr, start, end, 2.0):
                xs: list[float] = []
                ys: list[float] = []
                for x, y in s["values"]:
                    if xs and float(x) - start - xs[-1] > 5:
                        xs.append(xs[-1] + 2)  # no sample: a gap, not a line across it
                        ys.append(math.nan)
                    xs.append(float(x) - start)
                    ys.append(float(y))
                ax.plot(xs, ys, label=_legend(t.get("legendFormat", ""), s["metric"]), lw=1.2)
        if texts:
            ax.axis("off")
            ax.text(
                0.02,
                0.9,
                "\n".join(texts[:12]),
                va="top",
                fontsize=11 if len(texts) < 3 else 7,
                transform=ax.transAxes,
            )
            continue
        ax.tick_params(labelsize=7)
        ax.set_xlabel("seconds", fontsize=7)
        if unit:
            ax.set_ylabel(unit, fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    fig.savefig(out, dpi=60)


def main() -> int:
    """Runs the demos under a local Prometheus and writes the PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "deploy/grafana/dashboard.png")
    parser.add_argument(
        "--extra-mib",
        type=int,
        nargs="+",
        default=[0, 64, 256],
        help="one demo run per value: extra MiB of state per rank (default 0 64 256)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sd = Path(tmp) / "targets.json"
        with LocalPrometheus(Path(tmp) / "prom", sd_file=sd, rule_files=RULES) as prom:
            prom.wait_ready()
            start = time.time()
            for mib in args.extra_mib:
                print(f"demo with {mib} extra MiB per rank ...", flush=True)
                rc = run_demo(
                    DemoConfig(
                        steps=200,
                        kill_at=40,
                        hidden=256,
                        extra_bytes=mib << 20,
                        prometheus_sd=str(sd),
                        linger_s=5,
                    ),
                    as_json=True,
                    out=io.StringIO(),
                )
                if rc != 0:
                    print(f"demo failed (rc {rc})", file=sys.stderr)
                    return rc
            end = time.time() - 2
            render(prom, start, end, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
