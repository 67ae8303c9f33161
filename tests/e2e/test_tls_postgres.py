"""PostgreSQL over TLS with sslmode=verify-full: a cluster of the test's own, a CA of its own.

The machine's PostgreSQL is never reconfigured: the test runs initdb and
pg_ctl (as the `postgres` user when it runs as root, which initdb refuses)
on a free port, with ssl=on and a server certificate of the test's CA.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.e2e.cli_helpers import OK, UNAVAILABLE, assert_one_error_line, cli, describe
from tests.factories import make_sessions
from tests.servers import free_port
from tests.tls import TestCA

BIN = Path("/usr/lib/postgresql/15/bin")


class TlsPostgres:
    def __init__(self, ca: TestCA) -> None:
        initdb = shutil.which("initdb") or str(BIN / "initdb")
        self.bin = Path(initdb).parent
        self.port = free_port()
        # Not under pytest's tmp_path: the postgres user must reach it.
        self.base = Path(tempfile.mkdtemp(prefix="dnd-pgtls-"))
        self.data = self.base / "data"
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        server = ca.issue("postgres", names=("127.0.0.1",))
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        for source, name in ((server.cert, "server.crt"), (server.key, "server.key")):
            target = self.data / name
            shutil.copy(source, target)
            target.chmod(0o600)
            if self.as_postgres:
                shutil.chown(target, "postgres", "postgres")
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.base} -c ssl=on "
            "-c ssl_cert_file=server.crt -c ssl_key_file=server.key -c fsync=off"
        )
        self.run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.base / "log"),
            "-w",
            "-o",
            options,
            "start",
        )

    def run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self.as_postgres, str(self.bin / program), *args],
            check=True, capture_output=True, timeout=120, cwd=self.base,
        )  # fmt: skip

    def url(self, rootcert: Path, host: str = "127.0.0.1", sslmode: str = "verify-full") -> str:
        return (
            f"postgresql://postgres@{host}:{self.port}/postgres"
            f"?sslmode={sslmode}&sslrootcert={rootcert}"
        )

    def stop(self) -> None:
        try:
            self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsPostgres, TestCA]]:
    ca = TestCA(tmp_path_factory.mktemp("pg-ca"))
    server = TlsPostgres(ca)
    yield server, ca
    server.stop()


def test_backup_into_postgres_over_verified_tls(tls_pg, redis_server_url, redis_client, keys):
    server, ca = tls_pg
    url = server.url(ca.path)
    env = {"DATABASE_URL": url, "REDIS_URL": redis_server_url, "REDIS_KEY_PREFIX": keys.prefix}
    done = cli(env, "migrate", "up")
    assert done.returncode == OK, describe(done)
    make_sessions(redis_client, keys, 2, 10)
    done = cli(env, "backup", "--all", "--local")
    assert done.returncode == OK, describe(done)
    assert "warning" not in done.stderr
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM client_messages").fetchone() == (20,)
        ssl = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert ssl == (True,)


@pytest.mark.parametrize("wrong", ["ca", "hostname"])
def test_a_certificate_that_does_not_match_is_refused(tls_pg, tmp_path, wrong):
    server, ca = tls_pg
    if wrong == "ca":
        url = server.url(TestCA(tmp_path / "other", name="someone else's CA").path)
    else:
        url = server.url(ca.path, host="localhost")  # the certificate names 127.0.0.1 only
    done = cli({"DATABASE_URL": url}, "migrate", "status")
    assert done.returncode == UNAVAILABLE, describe(done)
    line = assert_one_error_line(done, "check DATABASE_URL")
    assert ("certificate verify failed" if wrong == "ca" else "does not match") in line, line
