"""Start ``app.py`` in a subprocess on 127.0.0.1 and a free port, for the app and browser tests
(and the latency benchmark). One server per test session, shared by the test files that import
the ``app_server`` fixture from here."""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets" / "mnist"
READY_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def examples() -> list[dict]:
    """The sample pairs listed in assets/mnist/examples.json, with absolute paths."""
    items = json.loads((ASSETS / "examples.json").read_text())["examples"]
    return [dict(it, moving=str(ASSETS / it["moving"]), fixed=str(ASSETS / it["fixed"]))
            for it in items]


@dataclass
class AppProcess:
    """``python app.py`` listening on ``url``; ``cold_start_s`` is process start → first 200."""

    port: int
    proc: subprocess.Popen
    log_path: Path
    started: float
    cold_start_s: float | None = None
    url: str = field(init=False)

    def __post_init__(self):
        self.url = f"http://127.0.0.1:{self.port}/"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with code {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        self.cold_start_s = time.monotonic() - self.started
                        return self.cold_start_s
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"app did not serve {self.url} within {timeout:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_app(env: dict | None = None, threads: int = 1) -> AppProcess:
    """Launch app.py on a free port and return at once (call ``wait_ready``)."""
    port = free_port()
    e = dict(os.environ)
    e.update({"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
              "GRADIO_ANALYTICS_ENABLED": "False", "APP_TORCH_THREADS": str(threads),
              "PYTHONUNBUFFERED": "1"})
    e.setdefault("HF_HUB_OFFLINE", "1")    # the tests use the shipped checkpoints only
    e.update(env or {})
    log = Path(tempfile.mkstemp(prefix="app-", suffix=".log")[1])
    f = open(log, "wb")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=e,
                            stdout=f, stderr=subprocess.STDOUT)
    f.close()
    return AppProcess(port=port, proc=proc, log_path=log, started=started)


_shared: AppProcess | None = None


def shared_app() -> AppProcess:
    """One app server for the whole test session (stopped at exit)."""
    global _shared
    if _shared is None or _shared.proc.poll() is not None:
        _shared = start_app()
        atexit.register(_shared.stop)
        _shared.wait_ready()
        print(f"\napp cold start: {_shared.cold_start_s:.2f} s")
    return _shared


@pytest.fixture(scope="session")
def app_server() -> AppProcess:
    app = shared_app()
    yield app
    # stopped by atexit, so a second test file importing this fixture reuses the same server
