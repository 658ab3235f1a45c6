"""Start a ``zhtune`` server command (``serve``, ``webui``) in a subprocess for a test, as a user
would, wait until it answers, and stop it afterwards."""

from __future__ import annotations

import os
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


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, poll: float = 0.2) -> bool:
    """Wait until ``url`` answers 200; False if ``proc`` exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(poll)


@contextmanager
def zhtune_server(
    args: list[str],
    log: Path,
    ready_path: str,
    timeout: float = 90.0,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run ``zhtune ARGS... --port P`` with its output in ``log``; yield ``http://127.0.0.1:P``
    once ``ready_path`` answers 200 (fail the test with the log if it exits or never does)."""
    with zhtune_process(args, log, ready_path, timeout, cwd, env) as (url, _):
        yield url


@contextmanager
def zhtune_process(
    args: list[str],
    log: Path,
    ready_path: str,
    timeout: float = 90.0,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """:func:`zhtune_server`, yielding the process too (for a test that signals it)."""
    port = free_port()
    cmd = [sys.executable, "-m", "zhtune", *args, "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **(env or {})}
        )
        try:
            if not wait_ready(f"{url}{ready_path}", proc, timeout):
                pytest.fail(f"zhtune {args[0]} did not start:\n{log.read_text()}")
            yield url, proc
        finally:
            stop(proc, 20)


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """End ``proc``: SIGTERM (a server drains), then SIGKILL if it is still there after ``timeout`` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def zhtune_serve(model_dir: str | Path, log: Path, *args: str, timeout: float = 90.0) -> Iterator[str]:
    """``zhtune serve MODEL_DIR ARGS...`` (see :func:`zhtune_server`), ready once ``/health`` answers."""
    return zhtune_server(["serve", str(model_dir), *args], log, "/health", timeout)
