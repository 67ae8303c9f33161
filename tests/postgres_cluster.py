"""A PostgreSQL cluster a test starts for itself (initdb/pg_ctl), with password authentication.

The machine's shared server trusts every local connection, so a test that must
prove what a password protects, or create roles (which are cluster-wide), starts
its own cluster here on a free port and stops it afterwards. PostgreSQL refuses
to run as root: when the tests run as root, the cluster runs as the `postgres`
system user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg

from tests.servers import free_port


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
            return str(candidate)
        raise AssertionError(f"{name} is not installed (it comes with the PostgreSQL server)")
    return found


class PostgresCluster:
    """A cluster on 127.0.0.1:<port>; every connection over TCP needs a password (scram)."""

    def __init__(self, superuser_password: str) -> None:
        self.port = free_port()
        self.password = superuser_password
        # Not under pytest's tmp_path: the `postgres` user must be able to reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="dnd-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.dir, account.pw_uid, account.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]
        pwfile = self.dir / "pw"
        pwfile.write_text(superuser_password)
        if self._run_as:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run(
            _binary("initdb"), "-D", str(self.data), "-U", "postgres", "--pwfile", str(pwfile),
            "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        self._run(
            _binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
            "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )  # fmt: skip

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self._run_as, *args], capture_output=True, text=True, check=False, timeout=120
        )
        if done.returncode != 0:
            raise AssertionError(f"{args[0]} failed ({done.returncode}): {done.stderr}")

    def url(self, user: str = "postgres", password: str | None = None, db: str = "postgres") -> str:
        secret = self.password if password is None else password
        auth = f"{quote(user, safe='')}:{quote(secret, safe='')}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def execute(self, *statements: str, db: str = "postgres") -> None:
        """Run statements as the superuser."""
        with psycopg.connect(self.url(db=db), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement.encode())

    def stop(self) -> None:
        with contextlib.suppress(AssertionError):
            self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def postgres_cluster(superuser_password: str) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(superuser_password)
    try:
        yield cluster
    finally:
        cluster.stop()


def wait_until_up(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
