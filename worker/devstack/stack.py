"""The dev stack from start to finish: plan, start, report, watch, stop.

Which servers it starts: each of REDIS_URL, CELERY_BROKER_URL,
CELERY_RESULT_BACKEND and DATABASE_URL that is set in the environment is used
as it is; each one that is not points at the embedded server (Redis database 0
for the data, 1 for the broker, 2 for the results). A server is started only
when something points at it. POSTGRES_HOST counts as setting the database.

When a child dies unexpectedly: Celery's processes (worker, beat, Flower) are
restarted after 1, 2, 4, ... s; a sixth death within five minutes stops
everything (exit status 1). An embedded server that dies stops everything at
once: restarting a database under running workers hides the problem, and its
log says what happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import site
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

from worker.cli import exit_codes
from worker.devstack import DEV_BACKUP_SCHEDULE, DevStackError
from worker.devstack.datadir import DataDir, choose_port, port_is_free
from worker.devstack.processes import (
    Child,
    ChildSpec,
    Supervisor,
    describe_exit,
    stop_leftovers,
)
from worker.devstack.servers import HOST, EmbeddedPostgres, EmbeddedRedis
from worker.errors import ConfigError
from worker.settings import Settings, redact_url

DEFAULT_REDIS_PORT = 16379
DEFAULT_POSTGRES_PORT = 15432
# The Redis URLs the embedded server can stand in for, and the database index of each.
REDIS_DATABASES = {"REDIS_URL": 0, "CELERY_BROKER_URL": 1, "CELERY_RESULT_BACKEND": 2}
# Settings a CLI in another terminal must share with the workers, when set here.
SHARED_SETTINGS = ("REDIS_KEY_PREFIX", "CELERY_QUEUE_PREFIX", "CELERY_KEY_PREFIX", "BACKUP_SHARDS")
CELERY_CHILDREN = ("flower", "beat", "worker")
SERVERS = ("redis", "postgres")
MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0
SERVER_START_TIMEOUT_S = 60.0
READY_LINE = "dnd-client dev: ready; Ctrl-C stops everything"


@dataclass(frozen=True, slots=True)
class Options:
    data_dir: Path
    demo: int = 0
    flower_port: int = 5555
    redis_port: int | None = None
    postgres_port: int | None = None
    concurrency: int = 2
    beat: bool = True
    flower: bool = True
    stop_timeout: float = 30.0
    start_timeout: float = 90.0
    output: str = "table"  # "json": the ready block as one JSON object on stdout


class Console:
    """Status lines to stderr; the ready block (URLs, exports) to stdout."""

    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        self.stdout = stdout
        self.stderr = stderr

    def say(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stderr.write(f"dnd-client dev: {message}\n")
            self.stderr.flush()

    def show(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stdout.write(text)
            self.stdout.flush()


@dataclass
class StopRequest:
    """Set by SIGINT, SIGTERM or SIGHUP; a second one sets ``hurry``."""

    requested: threading.Event = field(default_factory=threading.Event)
    hurry: threading.Event = field(default_factory=threading.Event)
    signal_name: str = ""


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Turn stop signals into flags, checked at safe points (never mid-spawn)."""
    request = StopRequest()

    def handle(signum: int, frame: FrameType | None) -> None:
        if request.requested.is_set():
            request.hurry.set()
            return
        request.signal_name = signal.Signals(signum).name
        request.requested.set()

    previous = {
        sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _given(environ: Mapping[str, str], name: str) -> bool:
    return bool(environ.get(name, "").strip())


class DevStack:
    def __init__(self, options: Options, environ: Mapping[str, str], console: Console) -> None:
        self.options = options
        self.environ = dict(environ)
        self.console = console
        self.say = console.say
        self.data = DataDir(options.data_dir.expanduser().resolve())
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None

    # -- the whole run ----------------------------------------------------------

    def run(self) -> int:
        self.data.create()
        with self.data.locked():
            stop_leftovers(self.data.pid_file, self.say)
            supervisor = Supervisor(self.data.pid_file)
            with stop_signals() as stop:
                try:
                    if not self._start(supervisor, stop):
                        self.say(f"{stop.signal_name}: stopping before everything was up")
                        return exit_codes.OK
                    return self._watch(supervisor, stop)
                finally:
                    self._shutdown(supervisor, stop)

    # -- start ----------------------------------------------------------------

    def _start(self, supervisor: Supervisor, stop: StopRequest) -> bool:
        """Start everything; False when a stop was asked for on the way."""
        from worker import migrate
        from worker.celery_config import parse_schedule
        from worker.flower_guard import auth_problem

        opts = self.options
        env = self.environ
        self.say(f"data dir {self.data.root}")
        flower_auth = env.get("FLOWER_BASIC_AUTH", "").strip()
        if flower_auth:
            problem = auth_problem({"FLOWER_BASIC_AUTH": flower_auth})
            if problem:
                raise ConfigError(problem)
        else:
            flower_auth = self.data.flower_credentials()
        if opts.flower and not port_is_free(opts.flower_port):
            raise DevStackError(
                f"Flower's port {opts.flower_port} is in use: choose another "
                "with --flower-port (or FLOWER_PORT), or --no-flower"
            )

        child_env = self._child_env(flower_auth)
        # Every setting is checked before anything starts.
        settings = Settings.from_env(child_env)
        parse_schedule(settings.backup_schedule, "BACKUP_SCHEDULE")

        if self.redis is not None:
            self.redis.prepare()
            self.say(f"starting Redis {self.redis.version} (embedded) on {HOST}:{self.redis.port}")
            child = supervisor.start(self.redis.spec(self.data.log("redis"), env))
            if not self._wait(child, self.redis.ready, SERVER_START_TIMEOUT_S, stop):
                return False
        if self.postgres is not None:
            log = self.data.log("postgres")
            if self.postgres.prepare(log, env, self.say):
                self.say(
                    f"made a new PostgreSQL {self.postgres.version} cluster in "
                    f"{self.postgres.pgdata}"
                )
            if stop.requested.is_set():
                return False
            self.say(
                f"starting PostgreSQL {self.postgres.version} (embedded) on {HOST}:"
                f"{self.postgres.port}"
            )
            child = supervisor.start(self.postgres.spec(log, env))
            if not self._wait(child, self.postgres.ready, SERVER_START_TIMEOUT_S, stop):
                return False
            if self.postgres.ensure_database():
                self.say(f"created the database {self.postgres.url()}")

        applied = migrate.up(settings)
        self.say(
            f"migrations: applied {', '.join(applied)}"
            if applied
            else "migrations: the schema is up to date"
        )
        if opts.demo:
            self._write_demo(settings)
        if stop.requested.is_set():
            return False

        started = [supervisor.start(spec) for spec in self._celery_specs(child_env)]
        for child in started:
            self.say(f"starting {child.name} (pid {child.pid})")
        for child in started:
            if not self._wait(child, self._ready_check(child), opts.start_timeout, stop):
                return False
        if opts.output == "json":
            self.console.show(self._ready_json(child_env, flower_auth))
        else:
            self.console.show(self._ready_text(child_env, flower_auth))
        return True

    def _child_env(self, flower_auth: str) -> dict[str, str]:
        """The environment of every child: the user's, plus what the stack provides."""
        opts = self.options
        env = dict(self.environ)
        state = self.data.load_state()
        embedded_redis = [name for name in REDIS_DATABASES if not _given(env, name)]
        if embedded_redis:
            port, note = choose_port(
                "Redis",
                "--redis-port",
                opts.redis_port,
                state.get("redis_port"),
                DEFAULT_REDIS_PORT,
            )
            if note:
                self.say(note)
            self.redis = EmbeddedRedis(self.data.redis, port)
            state["redis_port"] = port
            for name in embedded_redis:
                env[name] = self.redis.url(REDIS_DATABASES[name])
        if not (_given(env, "DATABASE_URL") or _given(env, "POSTGRES_HOST")):
            port, note = choose_port(
                "PostgreSQL",
                "--postgres-port",
                opts.postgres_port,
                state.get("postgres_port"),
                DEFAULT_POSTGRES_PORT,
            )
            if note:
                self.say(note)
            self.postgres = EmbeddedPostgres(self.data.postgres, port)
            state["postgres_port"] = port
            env["DATABASE_URL"] = self.postgres.url()
        self.data.save_state(state)
        if not _given(env, "BACKUP_SCHEDULE"):
            env["BACKUP_SCHEDULE"] = DEV_BACKUP_SCHEDULE
        if not _given(env, "BEAT_SCHEDULE_FILE"):
            env["BEAT_SCHEDULE_FILE"] = str(self.data.beat_schedule)
        # Always set, so Flower never starts without authentication.
        env["FLOWER_BASIC_AUTH"] = flower_auth
        env["PYTHONUNBUFFERED"] = "1"
        pythonpath = _pythonpath(env)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        return env

    def _celery_specs(self, env: Mapping[str, str]) -> list[ChildSpec]:
        """The worker, and beat and Flower unless turned off: `celery -A worker ...`."""
        opts = self.options
        commands = {
            "worker": ("worker", "-n", "dev@%h", "--concurrency", str(opts.concurrency),
                       "--loglevel", "INFO", "--without-mingle", "--without-gossip"),
            "beat": ("beat", "--loglevel", "INFO"),
            "flower": ("flower", f"--port={opts.flower_port}", f"--address={HOST}"),
        }  # fmt: skip
        wanted = {"worker": True, "beat": opts.beat, "flower": opts.flower}
        return [
            ChildSpec(
                name=name,
                argv=(sys.executable, "-m", "celery", "-A", "worker", *args),
                env=env,
                cwd=self.data.root,
                log_path=self.data.log(name),
                restart=True,
            )
            for name, args in commands.items()
            if wanted[name]
        ]

    def _ready_check(self, child: Child) -> Callable[[], bool]:
        if child.name == "worker":
            return lambda: " ready." in child.output()
        if child.name == "beat":
            return lambda: "beat: Starting" in child.output()
        return lambda: _http_answers(HOST, self.options.flower_port)

    def _wait(
        self, child: Child, ready: Callable[[], bool], timeout: float, stop: StopRequest
    ) -> bool:
        """Wait until ``ready()``; False if a stop is asked for meanwhile."""
        deadline = time.monotonic() + timeout
        while not stop.requested.is_set():
            if ready():
                return True
            status = child.poll()
            if status is not None:
                raise DevStackError(
                    f"{child.name} {describe_exit(status)} while starting: "
                    f"{child.last_lines() or 'no output'} (log: {child.spec.log_path})"
                )
            if time.monotonic() > deadline:
                raise DevStackError(
                    f"{child.name} was not ready after {timeout:g} s (log: {child.spec.log_path})"
                )
            stop.requested.wait(0.2)
        return False

    def _write_demo(self, settings: Settings) -> None:
        import redis

        from worker.devstack.demo import write_demo_sessions
        from worker.keys import RedisKeys

        client = redis.Redis.from_url(settings.redis_url)
        try:
            result = write_demo_sessions(
                client, RedisKeys(settings.redis_key_prefix), self.options.demo
            )
        except redis.RedisError as exc:
            raise DevStackError(
                f"cannot write the demo sessions to {redact_url(settings.redis_url)}: {exc}"
            ) from None
        finally:
            client.close()
        note = f" ({result.already_there} were there already)" if result.already_there else ""
        self.say(f"demo: wrote {result.written} sessions with {result.messages} messages{note}")

    # -- report -----------------------------------------------------------------

    def _ready_text(self, env: Mapping[str, str], flower_auth: str) -> str:
        opts = self.options
        rows: list[tuple[str, str, str]] = []
        labels = {
            "REDIS_URL": "Redis (data)",
            "CELERY_BROKER_URL": "Celery broker",
            "CELERY_RESULT_BACKEND": "Celery results",
        }
        for name, label in labels.items():
            given = _given(self.environ, name)
            where = (
                f"from {name}"
                if given
                else f"embedded Redis {self.redis.version}"
                if self.redis
                else ""
            )
            rows.append((label, redact_url(env[name]), where))
        if self.postgres is not None:
            rows.append(
                ("PostgreSQL", self.postgres.url(), f"embedded PostgreSQL {self.postgres.version}")
            )
        else:
            source = "DATABASE_URL" if _given(self.environ, "DATABASE_URL") else "POSTGRES_*"
            db = redact_url(Settings.from_env(env).database_url)
            rows.append(("PostgreSQL", db, f"from {source}"))
        if opts.flower:
            user, _, password = flower_auth.split(",")[0].partition(":")
            if _given(self.environ, "FLOWER_BASIC_AUTH"):
                login = f"user {user}, password as in FLOWER_BASIC_AUTH"
            else:
                login = f"user {user}, password {password}"
            rows.append(("Flower", f"http://{HOST}:{opts.flower_port}/", login))
        rows.append(("worker", f"dev@{socket.gethostname()}", f"concurrency {opts.concurrency}"))
        if opts.beat:
            rows.append(("beat", f"BACKUP_SCHEDULE={env['BACKUP_SCHEDULE']}", ""))
        width = max(len(r[0]) for r in rows)
        url_width = max(len(r[1]) for r in rows)
        lines = ["", f"dnd-client dev is up. Data: {self.data.root}  Logs: {self.data.logs}", ""]
        lines += [f"  {a:<{width}}  {b:<{url_width}}  {c}".rstrip() for a, b, c in rows]
        lines += [
            "",
            "In another terminal, paste these lines, then run `dnd-client backup --all`:",
            "",
        ]
        for name in ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DATABASE_URL"):
            if name == "DATABASE_URL" and self.postgres is None:
                lines.append("# the database: your DATABASE_URL / POSTGRES_* settings, as here")
            elif _given(self.environ, name):
                lines.append(f"# {name}: yours, as set here")
            else:
                lines.append(f"export {name}={shlex.quote(env[name])}")
        for name in SHARED_SETTINGS:
            if _given(self.environ, name):
                lines.append(f"export {name}={shlex.quote(self.environ[name])}")
        lines += ["", READY_LINE, ""]
        return "\n".join(lines)

    def _ready_json(self, env: Mapping[str, str], flower_auth: str) -> str:
        """The ready block for programs: one JSON object, then the ready line."""
        opts = self.options
        exports = {
            name: env[name]
            for name in ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DATABASE_URL")
            if not _given(self.environ, name)
            and not (name == "DATABASE_URL" and self.postgres is None)
        }
        # As in the text: the settings another terminal must share, when given here.
        exports.update(
            {name: self.environ[name] for name in SHARED_SETTINGS if _given(self.environ, name)}
        )
        payload: dict[str, object] = {
            "data_dir": str(self.data.root),
            "logs": str(self.data.logs),
            "redis": redact_url(env["REDIS_URL"]),
            "broker": redact_url(env["CELERY_BROKER_URL"]),
            "results": redact_url(env["CELERY_RESULT_BACKEND"]),
            "database": (
                self.postgres.url()
                if self.postgres is not None
                else redact_url(Settings.from_env(env).database_url)
            ),
            "worker": {"name": f"dev@{socket.gethostname()}", "concurrency": opts.concurrency},
            "beat": {"schedule": env["BACKUP_SCHEDULE"]} if opts.beat else None,
            # URLs given in the environment are not repeated: they are yours.
            "exports": exports,
        }
        if opts.flower:
            user, _, password = flower_auth.split(",")[0].partition(":")
            generated = not _given(self.environ, "FLOWER_BASIC_AUTH")
            payload["flower"] = {
                "url": f"http://{HOST}:{opts.flower_port}/",
                "user": user,
                "password": password if generated else None,
            }
        return json.dumps(payload, indent=2) + "\n" + READY_LINE + "\n"

    # -- watch ------------------------------------------------------------------

    def _watch(self, supervisor: Supervisor, stop: StopRequest) -> int:
        """Relay deaths, restart Celery's processes; returns on a stop signal or a fatal death."""
        while not stop.requested.wait(0.5):
            now = time.monotonic()
            for child in list(supervisor.children.values()):
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        supervisor.restart(child)
                        self.say(f"{child.name} restarted (pid {child.pid})")
                    continue
                status = child.poll()
                if status is None:
                    continue
                what = f"{child.name} (pid {child.pid}) {describe_exit(status)}"
                detail = f"last output: {child.last_lines(1) or 'none'}; log: {child.spec.log_path}"
                if not child.spec.restart:
                    self.say(f"{what}; stopping everything ({detail})")
                    return exit_codes.FAILURE
                recent = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
                if len(recent) >= MAX_RESTARTS:
                    self.say(
                        f"{what} again: {len(recent) + 1} times in "
                        f"{RESTART_WINDOW_S / 60:g} minutes; stopping everything ({detail})"
                    )
                    return exit_codes.FAILURE
                delay = min(2 ** len(recent), 30)
                child.restart_at = now + delay
                self.say(f"{what}; restarting it in {delay} s ({detail})")
        self.say(f"{stop.signal_name}: stopping")
        return exit_codes.OK

    # -- stop -----------------------------------------------------------------

    def _shutdown(self, supervisor: Supervisor, stop: StopRequest) -> None:
        timeout = self.options.stop_timeout
        if any(
            supervisor.children[n].running() for n in CELERY_CHILDREN if n in supervisor.children
        ):

            def waiting(children: list[Child]) -> None:
                names = ", ".join(c.name for c in children)
                self.say(
                    f"waiting for {names} to finish (up to {timeout:g} s in all; "
                    "Ctrl-C again kills them now)"
                )

            killed = supervisor.stop(CELERY_CHILDREN, timeout, stop.hurry, on_wait=waiting)
            if killed:
                self.say(f"killed {', '.join(c.name for c in killed)}: not stopped in time")
        else:
            supervisor.stop(CELERY_CHILDREN, 0, stop.hurry)
        servers = [n for n in SERVERS if n in supervisor.children]
        if servers:
            self.say(f"stopping {' and '.join(servers)}")
            killed = supervisor.stop(servers, SERVER_START_TIMEOUT_S, stop.hurry)
            if killed:
                self.say(f"killed {', '.join(c.name for c in killed)}: not stopped in time")
        supervisor.forget_pid_file()
        if supervisor.children:
            self.say(f"stopped everything; the data stays in {self.data.root}")


def _http_answers(host: str, port: int) -> bool:
    """True once an HTTP server answers on host:port (any status, 401 included)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthcheck", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def _pythonpath(env: Mapping[str, str]) -> str | None:
    """PYTHONPATH for the children, so `celery -A worker` imports this very package.

    Needed when `dnd-client` runs from a checkout (bin/dnd-client) without being
    installed; an installed package is found anyway and is left as it is.
    """
    import worker

    root = Path(worker.__file__).resolve().parent.parent
    site_dirs = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    existing = env.get("PYTHONPATH", "")
    if root in site_dirs:
        return existing or None
    parts = [str(root)] + [p for p in existing.split(os.pathsep) if p and p != str(root)]
    return os.pathsep.join(parts)
