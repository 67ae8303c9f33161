"""The dev stack's data dir: its layout, its lock, the ports and credentials it keeps.

Everything `dnd-client dev` writes lives under one folder (``--data-dir``,
default ``./dev-data``)::

    postgres/             the embedded PostgreSQL cluster (PGDATA)
    redis/                the embedded Redis (appendonly.aof)
    logs/                 one log per process: postgres, redis, worker, beat, flower
    celerybeat-schedule   beat's schedule state
    state.json            the ports last used, so the URLs stay the same across restarts
    flower-auth           the generated Flower credentials (mode 0600)
    dev.pids              the processes started, while they run (for leftovers)
    .lock                 held while a `dnd-client dev` uses the folder

Removing the folder (with no `dnd-client dev` running on it) resets everything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.devstack import DevStackError

FLOWER_USER = "dev"


@dataclass(frozen=True, slots=True)
class DataDir:
    root: Path

    @property
    def postgres(self) -> Path:
        return self.root / "postgres"

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def beat_schedule(self) -> Path:
        return self.root / "celerybeat-schedule"

    @property
    def pid_file(self) -> Path:
        return self.root / "dev.pids"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def flower_auth_file(self) -> Path:
        return self.root / "flower-auth"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def create(self) -> None:
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DevStackError(f"cannot create the data dir {self.root}: {exc.strerror}") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock: one `dnd-client dev` per data dir."""
        path = self.root / ".lock"
        # Opened close-on-exec (Python's default): no child keeps the lock.
        with path.open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                handle.seek(0)
                holder = handle.read().strip() or "?"
                raise DevStackError(
                    f"another `dnd-client dev` (pid {holder}) is using {self.root}; "
                    "stop it first, or give this one another --data-dir"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()

    # -- ports ----------------------------------------------------------------

    def load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def save_state(self, state: Mapping[str, Any]) -> None:
        self.state_file.write_text(json.dumps(dict(state), indent=2) + "\n")

    # -- Flower ---------------------------------------------------------------

    def flower_credentials(self) -> str:
        """``user:password`` for Flower: made once, then read back (they survive restarts)."""
        path = self.flower_auth_file
        with contextlib.suppress(FileNotFoundError):
            value = path.read_text().strip()
            user, sep, password = value.partition(":")
            if user and sep and password:
                return value
        value = f"{FLOWER_USER}:{secrets.token_urlsafe(18)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        return value


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` (a server could bind it now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the servers do: a port whose old connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def any_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def choose_port(
    what: str, option: str, explicit: int | None, recorded: Any, default: int
) -> tuple[int, str | None]:
    """The port for a server, and a note when it is not the one used last time.

    An explicit port must be free. Otherwise: the port this data dir used last
    time (so the printed URLs stay valid), else ``default``, else any free port.
    """
    if explicit is not None:
        if not port_is_free(explicit):
            raise DevStackError(f"{what} port {explicit} ({option}) is in use")
        return explicit, None
    last = recorded if isinstance(recorded, int) and 0 < recorded < 65536 else None
    for candidate in (last, default):
        if candidate is not None and port_is_free(candidate):
            if last is not None and candidate != last:
                return candidate, f"{what} port {last} is taken now; using {candidate}"
            return candidate, None
    port = any_free_port()
    note = f"{what} port {last or default} is taken; using {port} (set it with {option})"
    return port, note
