"""A real Prometheus server on 127.0.0.1, for tests and for rendering the dashboard.

It scrapes the targets a :class:`recoveryd.demo.cluster.LocalCluster` writes
(``file_sd_configs``), loads alert rules, and answers PromQL over its HTTP API.
Needs the ``prometheus`` binary (Debian package ``prometheus``;
``scripts/tools.sh`` installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from recoveryd.errors import RecoverydError

GRAFANA_DEFAULTS = {
    "__rate_interval": "2m",
    "__interval": "15s",
    "__range": "10m",
    "namespace": ".*",  # the dashboard's job filter at "All" (matches no label too)
}
"""What :func:`grafana_to_promql` puts for Grafana's built-in variables."""


class PrometheusError(RecoverydError, RuntimeError):
    """The server did not start, or answered a query with an error."""


def grafana_to_promql(expr: str, values: dict[str, str] | None = None) -> str:
    """An expression of a Grafana panel with its ``$__*`` variables replaced.

    Raises:
        PrometheusError: the expression uses a variable with no value given.
    """
    values = {**GRAFANA_DEFAULTS, **(values or {})}

    def put(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise PrometheusError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", put, expr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPrometheus:
    """A Prometheus server scraping the targets listed in ``sd_file``.

    Args:
        workdir: where its configuration and data go.
        sd_file: a ``file_sd_configs`` JSON file (it may not exist yet).
        rule_files: alert/recording rule files to load.
        scrape_interval: how often it scrapes and evaluates rules.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        sd_file: Path,
        rule_files: Sequence[Path] = (),
        scrape_interval: timedelta = timedelta(seconds=1),
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusError("no `prometheus` binary on PATH (apt-get install prometheus)")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        interval = f"{max(1, int(scrape_interval.total_seconds()))}s"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(p.resolve()) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": "recoveryd",
                    "file_sd_configs": [
                        {"files": [str(sd_file.resolve())], "refresh_interval": "1s"}
                    ],
                }
            ],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "prometheus.yml"
        cfg.write_text(json.dumps(config, indent=1))  # YAML is a superset of JSON
        self._log = (workdir / "prometheus.log").open("wb")
        self._proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._workdir = workdir

    def wait_ready(self, timeout: timedelta = timedelta(seconds=30)) -> LocalPrometheus:
        """Waits until the server answers ``/-/ready``.

        Raises:
            PrometheusError: it exited or was not ready within ``timeout``.
        """
        end = time.monotonic() + timeout.total_seconds()
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited ({self._proc.returncode}): {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready in {timeout}: {self.log()}")

    def log(self) -> str:
        """The server's log so far (the last 4000 characters)."""
        return (self._workdir / "prometheus.log").read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>``; returns its ``data``.

        Raises:
            PrometheusError: the server answered with an error (e.g. bad PromQL).
        """
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as err:
            body = json.load(err)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (a vector's samples; a scalar as one sample)."""
        data = self.api("query", query=expr, time=at)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(
        self, expr: str, start: float, end: float, step_s: float
    ) -> list[dict[str, Any]]:
        """A range query's series."""
        data = self.api("query_range", query=expr, start=start, end=end, step=step_s)
        return list(data["result"])

    def metric_names(self) -> set[str]:
        """Every metric name the server has samples of."""
        return set(self.api("label/__name__/values"))

    def close(self) -> None:
        """Stops the server."""
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        self._log.close()

    def __enter__(self) -> LocalPrometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
