"""A real, throw-away ``redis-server`` on a free local port (for the tests and the Redis benchmark)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = ("redis-server is not installed: install it with `apt-get install -y redis-server` "
                "(the project's test command does this)")


class RedisServerError(RuntimeError):
    """redis-server is missing or would not start; the message says why."""


def free_port() -> int:
    """A port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """``with RedisServer(folder) as server: server.url``: a server with no persistence, stopped on exit.

    The port is picked free, then bound by redis-server; another process can take it in between,
    so a server that cannot bind is started again on a new port (``attempts`` times)."""

    def __init__(self, folder: Path, attempts: int = 5, start_timeout: float = 10.0):
        self.folder, self.attempts, self.start_timeout = Path(folder), attempts, start_timeout
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(INSTALL_HINT)
        self.folder.mkdir(parents=True, exist_ok=True)
        problems = []
        for _ in range(self.attempts):
            self.port = free_port()
            log = self.folder / f"redis-{self.port}.log"
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.folder), "--logfile", str(log)],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            if self._answers():
                return self
            self.stop()
            problems.append(log.read_text().strip().splitlines()[-1:] if log.exists() else ["no log"])
        raise RedisServerError(f"redis-server did not start in {self.attempts} attempts: {problems}")

    def _answers(self) -> bool:
        """Wait until the server answers PING (False when it exited, e.g. its port was taken)."""
        import redis
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1).ping():
                    return True
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        return False

    def kill(self) -> None:
        """Stop the server at once (SIGKILL), as a crash or a lost host would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
