"""A private Prometheus server for a test: Debian's ``prometheus`` binary on a free port,
a generated config (1 s scrapes and rule evaluations), a temporary storage directory,
the repo's shipped alert rules; queried through its HTTP API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ALERT_RULES = ROOT / "contrib" / "prometheus" / "alerts.yml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(name: str) -> str | None:
    return shutil.which(name)


class PrometheusServer:
    def __init__(self, workdir: Path, targets: dict[str, tuple[str, str]]) -> None:
        """``targets``: job name -> (``host:port``, metrics path)."""
        self.port = free_port()
        self.workdir = workdir
        jobs = "".join(
            f"  - job_name: {job}\n"
            f"    metrics_path: {path}\n"
            f"    static_configs:\n      - targets: ['{address}']\n"
            for job, (address, path) in targets.items()
        )
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
            "  evaluation_interval: 1s\n"
            f"rule_files:\n  - {ALERT_RULES}\n"
            f"scrape_configs:\n{jobs}"
        )
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                str(binary("prometheus")),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_for(self._ready, 30, "prometheus to be ready")

    def _get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query", query=expr)
        assert data["status"] == "success", data
        return list(data["data"]["result"])

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def targets(self) -> dict[str, tuple[str, str]]:
        """job -> (health, last scrape error)."""
        data = self._get("/api/v1/targets")
        return {
            t["labels"]["job"]: (t["health"], t["lastError"]) for t in data["data"]["activeTargets"]
        }

    def targets_up(self) -> dict[str, bool]:
        return {job: health == "up" for job, (health, _) in self.targets().items()}

    def alerts(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/alerts")["data"]["alerts"])

    def alert_state(self, name: str, **labels: str) -> str | None:
        for alert in self.alerts():
            found = alert["labels"]
            if found.get("alertname") == name and all(found.get(k) == v for k, v in labels.items()):
                return str(alert["state"])
        return None

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.output()}")
            result = condition()
            if result:
                return result
            time.sleep(0.2)
        raise AssertionError(
            f"timed out waiting for {what}; targets: {self.targets()}; log:\n{self.output()}"
        )

    def output(self) -> str:
        self.log.flush()
        return (self.workdir / "prometheus.log").read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
