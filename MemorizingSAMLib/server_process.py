"""``memsam serve`` as a child process on a free port of 127.0.0.1: what the tests, the benchmarks and the demo
start when they need a real server (no torch in this process: the server imports it, not its starter)."""

from __future__ import annotations

import os
import re
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
    raises with the server's own error output). A context manager: leaving it stops the server. ``command``
    "web" starts ``memsam web`` instead, which is up once its page (``probe`` "/") answers.

    The child's stderr goes to a file (``log``), never to a pipe nobody reads, which would block a chatty server.
    """

    def __init__(
        self,
        args: Sequence[str],
        host: str = "127.0.0.1",
        port: int | None = None,
        env: dict[str, str] | None = None,
        startup_s: float = 60.0,
        command: str = "serve",
        probe: str = "/health",
    ) -> None:
        self.args, self.host, self.port = [str(a) for a in args], host, port or free_port(host)
        self.command, self.probe = command, probe
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
        cmd = [
            sys.executable,
            "-m",
            "MemorizingSAMLib.cli",
            self.command,
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(cmd + self.args, stdout=subprocess.DEVNULL, stderr=self._log, env=env, text=True)
        deadline = time.monotonic() + self.startup_s
        # Only "is it up?": the certificate is the client's business, not the starter's.
        probe = ssl._create_unverified_context() if self.url.startswith("https") else None
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + self.probe, timeout=1, context=probe).read()
                return self
            except (OSError, urllib.error.URLError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"memsam {self.command} exited: {self.errors().strip()}") from None
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"memsam {self.command} did not answer within {self.startup_s:g} s: {self.errors().strip()}")

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


def find_nginx() -> str | None:
    """Debian's nginx: on PATH, or the copy `make test` unpacks into .venv/nginx (no root, no service)."""
    import shutil

    local = Path(sys.prefix) / "nginx" / "usr" / "sbin" / "nginx"
    return os.environ.get("MEMSAM_NGINX") or shutil.which("nginx") or (str(local) if local.exists() else None)


class NginxProcess:
    """nginx with ``deploy/nginx.conf``, its upstreams, port and certificate replaced, in the foreground."""

    def __init__(
        self,
        conf: str | os.PathLike,
        upstreams: Sequence[int],
        port: int,
        cert: str,
        key: str,
        nginx: str | None = None,
    ) -> None:
        self.nginx = nginx or find_nginx()
        if self.nginx is None:
            raise RuntimeError("no nginx: install Debian's nginx, or run `make test`, which unpacks it into .venv")
        self.dir = Path(tempfile.mkdtemp(prefix="memsam-nginx-"))
        self.dir.chmod(0o755)  # started as root, nginx's workers run as nobody and must reach their temp folders
        text = Path(conf).read_text()
        lines = [f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in upstreams]
        text = re.sub(r"(?m)^\s*server 127\.0\.0\.1:\d+ .*;\n", "", text)
        text = text.replace("        keepalive 32;", "\n".join(lines) + "\n        keepalive 32;")
        text = re.sub(r"listen \d+ ssl;", f"listen 127.0.0.1:{port} ssl;", text)
        text = text.replace("/etc/ssl/memsam/cert.pem", str(cert)).replace("/etc/ssl/memsam/key.pem", str(key))
        text = text.replace("/tmp/memsam-nginx", str(self.dir / "t"))
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(text)
        self.port = port
        self.proc: subprocess.Popen | None = None
        self._log = open(self.dir / "stderr.txt", "w")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> NginxProcess:
        cmd = [self.nginx, "-p", str(self.dir), "-c", str(self.conf), "-g", "daemon off;"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nginx exited: {(self.dir / 'stderr.txt').read_text()}") from None
                time.sleep(0.1)
        raise RuntimeError("nginx did not listen within 20 s")

    def stop(self) -> None:
        import shutil

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NginxProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
