"""`kvlab sim serve` in a subprocess, as a launcher or an outside client sees it (shared by the
tests that talk to the simulated server over HTTP)."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    """A port the OS says is free now (bound to 127.0.0.1 with port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimServer:
    """A `kvlab sim serve` subprocess in its own process group; `lines` holds its log up to
    "Application startup complete." (the rest can be read from `proc.stdout` once it is stopped)."""

    def __init__(self, *argv: str):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvlab", "sim", "serve", *argv, "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited:\n" + "".join(self.lines))
            self.lines.append(line)
            if "Application startup complete." in line:
                break
        self.url = f"http://127.0.0.1:{self.port}"
        assert httpx.get(self.url + "/health").status_code == 200

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=20)
