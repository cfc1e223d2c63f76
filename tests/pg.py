"""A real, throw-away PostgreSQL server for tests (Debian's ``postgresql`` package).

``postgres_server`` (session scope) runs ``initdb`` and ``pg_ctl`` from
``/usr/lib/postgresql/*/bin`` on a temporary directory and a free 127.0.0.1 port — as the
``postgres`` user when the tests run as root (PostgreSQL refuses to run as root) — and stops it
at the end. ``pg_url`` (function scope) is a fresh empty database on it. Tests are skipped, with
the reason, only when the binaries are not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 30


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    bin_dir: Path
    data_dir: Path
    port: int
    user: str | None  # run as this user (when we are root), else as ourselves

    @property
    def url(self) -> str:
        return f"postgresql://bridge@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=START_TIMEOUT_S)

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data_dir} "
            # fsync off: a test server need not survive a power cut. synchronous_commit stays on:
            # the fault tests stop it with -m immediate, and a commit must survive that.
            "-c fsync=off -c full_page_writes=off"
        )
        log = self.data_dir / "server.log"
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(log), "-w", "-t", "30", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", check=False)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data_dir), "status", check=False).returncode == 0


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="bridge-pg-"))
    data = root / "data"
    data.mkdir()
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        os.chown(data, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bin_dir, data, _free_port(), user)
    try:
        server._run("initdb", "-D", str(data), "-U", "bridge", "-A", "trust", "--no-sync", "-E", "UTF8")
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    import psycopg

    if not postgres_server.running():  # a fault test stopped it and failed before restarting
        postgres_server.start()
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # name is ours: hex only
    yield postgres_server.url.rsplit("/", 1)[0] + "/" + name
    if not postgres_server.running():
        postgres_server.start()
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
