"""Local server processes (`mdt serve`, vLLM's OpenAI server) started by benchmarks and tests:
a free port, waiting for `/health`, stopping."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Callable


def free_port() -> int:
    """An unused TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(proc: subprocess.Popen, url: str, timeout_s: float, describe: Callable[[], str]) -> None:
    """Poll `url`/health until it answers 200; `describe()` (e.g. the server's log) goes into the
    error when the process exits or the time runs out (the process is killed then)."""
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{describe()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not answer within {timeout_s:.0f} s:\n{describe()}")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Terminate a server process (kill it if it lingers)."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
