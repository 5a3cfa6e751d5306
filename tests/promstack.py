"""The real node_exporter and Prometheus, on loopback, for ecosystem tests.

    with NodeExporter(textfile_dir) as ne, Prometheus([ne.address]) as prom:
        prom.wait_for("up", lambda r: len(r) == 1)
        prom.query('ebpf_tcp_rtt_seconds_count{peer="p1"}')

Each program is found by name on PATH (Debian: `prometheus-node-exporter`,
`prometheus`, `promtool`), gets a free port on 127.0.0.1 and its own
temporary data directory, is polled until ready (with a deadline, never a
fixed sleep) and is stopped (SIGTERM, then SIGKILL) on exit. Its output goes
to a log file that errors quote. `require()` turns a missing binary into
pytest.skip, which the suite's strict mode (EBPF_TELEMETRY_STRICT=1) turns
into a failure.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

NODE_EXPORTER_NAMES = ("prometheus-node-exporter", "node_exporter", "node-exporter")
PROMETHEUS_NAMES = ("prometheus",)
PROMTOOL_NAMES = ("promtool",)

# A Prometheus query result (the API's `data.result`): a list of samples for a
# vector, [ts, "value"] for a scalar. Kept as parsed JSON.
Result = Any


class StackError(RuntimeError):
    """A program did not start, or did not answer as expected."""


class QueryError(StackError):
    """Prometheus answered a query with status "error"."""

    def __init__(self, expr: str, error_type: str, error: str) -> None:
        super().__init__(f"query {expr!r} failed: {error_type}: {error}")
        self.expr, self.error_type, self.error = expr, error_type, error


def find_binary(names: Sequence[str]) -> str | None:
    """The first of names found on PATH (plus the sbin directories), or None."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    for name in names:
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def require(names: Sequence[str]) -> str:
    """The binary's path, or pytest.skip naming the Debian package to install."""
    found = find_binary(names)
    if found is None:
        pytest.skip(
            f"{names[0]} not found on PATH (apt-get install -y prometheus prometheus-node-exporter)"
        )
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def poll(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Call check until it returns True; StackError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise StackError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class _Program:
    """A child process on a loopback port, with a private temporary directory."""

    name = "program"
    ready_path = "/"
    start_timeout = 30.0
    port_attempts = 3

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.workdir = Path()
        self.log_path = Path()

    @property
    def address(self) -> str:
        """host:port, as a Prometheus target."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write what the program needs in self.workdir before it starts."""

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _is_ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise StackError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            status, _ = http_get(self.url + self.ready_path, timeout=2.0)
        except OSError:
            return False
        return status == 200

    def start(self) -> Self:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"promstack-{self.name}-")
        self.workdir = Path(self._tmp.name)
        self.log_path = self.workdir / f"{self.name}.log"
        last: StackError | None = None
        # The port is free when chosen but could be taken before the program
        # binds it: try a few.
        for _ in range(self.port_attempts):
            self.port = free_port()
            self.prepare()
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    start_new_session=True,
                )
            try:
                poll(self._is_ready, self.start_timeout, f"{self.name} on {self.address}")
                return self
            except StackError as e:
                last = e
                self._terminate()
                if "address already in use" not in self.log_tail().lower():
                    break
        self.stop()
        raise StackError(f"{self.name} did not become ready: {last}\n{self.log_tail()}")

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)

    def stop(self) -> None:
        self._terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class NodeExporter(_Program):
    """prometheus-node-exporter with only the textfile collector, on textfile_dir."""

    name = "node_exporter"
    ready_path = "/metrics"

    def __init__(self, textfile_dir: str | os.PathLike[str], binary: str | None = None) -> None:
        super().__init__(binary or require(NODE_EXPORTER_NAMES))
        self.textfile_dir = Path(textfile_dir)

    def command(self) -> list[str]:
        return [
            self.binary,
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={self.textfile_dir}",
            f"--web.listen-address={self.address}",
        ]

    def metrics_text(self) -> str:
        status, body = http_get(self.url + "/metrics")
        if status != 200:
            raise StackError(f"node_exporter /metrics answered {status}: {body[:200]!r}")
        return body.decode()


class Prometheus(_Program):
    """prometheus scraping targets every scrape_interval, rules evaluated as often."""

    name = "prometheus"
    ready_path = "/-/ready"

    def __init__(
        self,
        targets: Sequence[str] = (),
        scrape_interval: str = "1s",
        rule_files: Sequence[str | os.PathLike[str]] = (),
        binary: str | None = None,
        job: str = "node",
    ) -> None:
        super().__init__(binary or require(PROMETHEUS_NAMES))
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.rule_files = [str(Path(f).resolve()) for f in rule_files]
        self.job = job

    def config(self) -> dict[str, Any]:
        scrape: list[dict[str, Any]] = []
        if self.targets:
            scrape.append({"job_name": self.job, "static_configs": [{"targets": self.targets}]})
        return {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "rule_files": self.rule_files,
            "scrape_configs": scrape,
        }

    def prepare(self) -> None:
        # JSON is YAML: no YAML library needed to write the config.
        (self.workdir / "prometheus.yml").write_text(json.dumps(self.config(), indent=2))

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={self.address}",
            "--web.enable-lifecycle",
        ]

    def api(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """GET /api/v1/<path>; the decoded JSON body, whatever its status."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url, timeout=10.0)
        try:
            doc: dict[str, Any] = json.loads(body)
        except ValueError:
            raise StackError(f"{url} answered {status} with no JSON: {body[:200]!r}") from None
        return doc

    def query_raw(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """The whole answer of /api/v1/query (status, data or errorType/error)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", params)

    def query(self, expr: str, at: float | None = None) -> Result:
        """data.result of an instant query; QueryError if Prometheus refuses it."""
        doc = self.query_raw(expr, at)
        if doc.get("status") != "success":
            raise QueryError(expr, str(doc.get("errorType")), str(doc.get("error")))
        return doc["data"]["result"]

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[Result], bool],
        timeout: float = 30.0,
        interval: float = 0.25,
    ) -> Result:
        """Query expr until predicate(result) holds; the result, or StackError."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise StackError(
                    f"timed out after {timeout:g}s waiting on {expr!r}; last result: {result!r}"
                )
            time.sleep(interval)

    def targets_health(self) -> list[dict[str, Any]]:
        """The active targets as /api/v1/targets lists them."""
        doc = self.api("targets")
        active: list[dict[str, Any]] = doc["data"]["activeTargets"]
        return active


def values(result: Result) -> list[float]:
    """The sample values of a vector result (NaN and Inf included)."""
    return [float(sample["value"][1]) for sample in result]


def finite_values(result: Result) -> list[float]:
    return [v for v in values(result) if math.isfinite(v)]
