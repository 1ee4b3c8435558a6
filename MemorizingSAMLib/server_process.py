"""``memsam serve`` as a child process on a free port of 127.0.0.1: what the tests, the benchmarks and the demo
start when they need a real server (no torch in this process: the server imports it, not its starter)."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``memsam serve --port P [args]`` in a child process; ``start()`` returns once ``/health`` answers (or
    raises with the server's own error output). A context manager: leaving it stops the server.

    The child's stderr goes to a file (``log``), never to a pipe nobody reads, which would block a chatty server.
    """

    def __init__(
        self,
        args: Sequence[str],
        host: str = "127.0.0.1",
        port: int | None = None,
        env: dict[str, str] | None = None,
        startup_s: float = 60.0,
    ) -> None:
        self.args, self.host, self.port = [str(a) for a in args], host, port or free_port(host)
        self.env, self.startup_s = env, startup_s
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="memsam-server-log-", suffix=".txt", delete=False)
        self.log = Path(self._log.name)

    @property
    def url(self) -> str:
        scheme = "https" if "--tls-cert" in self.args else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "MemorizingSAMLib.cli", "serve", "--host", self.host, "--port", str(self.port)]
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(cmd + self.args, stdout=subprocess.DEVNULL, stderr=self._log, env=env, text=True)
        deadline = time.monotonic() + self.startup_s
        # Only "is it up?": the certificate is the client's business, not the starter's.
        probe = ssl._create_unverified_context() if self.url.startswith("https") else None
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1, context=probe).read()
                return self
            except (OSError, urllib.error.URLError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"memsam serve exited: {self.errors().strip()}") from None
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"memsam serve did not answer within {self.startup_s:g} s: {self.errors().strip()}")

    def errors(self) -> str:
        """What the server has written to stderr so far."""
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """As a crash would: SIGKILL, no clean-up by the server itself."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)
