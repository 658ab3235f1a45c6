"""Start ``zhtune serve`` in a subprocess for a test, as a user would, and stop it afterwards."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def zhtune_serve(model_dir: str | Path, log: Path, *args: str, timeout: float = 90.0) -> Iterator[str]:
    """Run ``zhtune serve MODEL_DIR --port P ARGS...`` with its output in ``log``; yield
    ``http://127.0.0.1:P`` once ``/health`` answers (fail the test with the log if it never does)."""
    port = free_port()
    cmd = [sys.executable, "-m", "zhtune", "serve", str(model_dir), "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"zhtune serve did not start:\n{log.read_text()}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
