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
from typing import Any, TextIO

from worker import exit_codes
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
from worker.flower_guard import auth_problem
from worker.secret_files import SecretFileError, with_secret_files
from worker.settings import DEFAULT_METRICS_PORT, Settings, redact_url

# The embedded servers' ports and beat's metrics port, by their key in the data dir's state file.
DEFAULT_PORTS = {"redis_port": 16379, "postgres_port": 15432, "metrics_port": DEFAULT_METRICS_PORT}
# The Redis URLs the embedded server can stand in for, and the database index of each.
REDIS_DATABASES = {"REDIS_URL": 0, "CELERY_BROKER_URL": 1, "CELERY_RESULT_BACKEND": 2}
REDIS_LABELS = {
    "REDIS_URL": "Redis (data)",
    "CELERY_BROKER_URL": "Celery broker",
    "CELERY_RESULT_BACKEND": "Celery results",
}
# The URLs a CLI in another terminal needs, in the order the ready block lists them.
URL_SETTINGS = (*REDIS_DATABASES, "DATABASE_URL")
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
    # Beat's metrics port (METRICS_PORT): None: the one used last, else 9808,
    # else any free one; 0: no metrics.
    metrics_port: int | None = None
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


def _checked_settings(child_env: Mapping[str, str]) -> Settings:
    """The children's settings; every one is checked before anything starts."""
    from worker.celery_config import parse_schedule

    settings = Settings.from_env(child_env)
    parse_schedule(settings.backup_schedule, "BACKUP_SCHEDULE")
    return settings


class DevStack:
    def __init__(self, options: Options, environ: Mapping[str, str], console: Console) -> None:
        self.options = options
        # <NAME>_FILE read here: the stack fills in the settings the user did
        # not give (REDIS_URL, DATABASE_URL, FLOWER_BASIC_AUTH), so a value
        # given as a file must count as given, and its children get one form.
        try:
            self.environ = with_secret_files(environ)
        except SecretFileError as exc:
            raise ConfigError(str(exc)) from None
        self.console = console
        self.say = console.say
        self.data = DataDir(options.data_dir.expanduser().resolve())
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        self.metrics_port = 0
        self.settings: Settings | None = None

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
        self.say(f"data dir {self.data.root}")
        flower_auth = self._flower_auth()
        self._check_flower_port()
        child_env = self._child_env(flower_auth)
        settings = self.settings = _checked_settings(child_env)
        if not (self._start_redis(supervisor, stop) and self._start_postgres(supervisor, stop)):
            return False
        self._migrate(settings)
        if self.options.demo:
            self._write_demo(settings)
        if stop.requested.is_set() or not self._start_celery(supervisor, stop, child_env):
            return False
        if self.options.output == "json":
            self.console.show(self._ready_json(child_env, flower_auth))
        else:
            self.console.show(self._ready_text(child_env, flower_auth))
        return True

    def _flower_auth(self) -> str:
        """FLOWER_BASIC_AUTH as given (checked), else the data dir's generated login."""
        flower_auth = self.environ.get("FLOWER_BASIC_AUTH", "").strip()
        if not flower_auth:
            return self.data.flower_credentials()
        problem = auth_problem({"FLOWER_BASIC_AUTH": flower_auth})
        if problem:
            raise ConfigError(problem)
        return flower_auth

    def _check_flower_port(self) -> None:
        opts = self.options
        if opts.flower and not port_is_free(opts.flower_port):
            raise DevStackError(
                f"Flower's port {opts.flower_port} is in use: choose another "
                "with --flower-port (or FLOWER_PORT), or --no-flower"
            )

    def _start_redis(self, supervisor: Supervisor, stop: StopRequest) -> bool:
        """Start the embedded Redis if anything points at it; False on a stop."""
        if self.redis is None:
            return True
        self.redis.prepare()
        self.say(f"starting Redis {self.redis.version} (embedded) on {HOST}:{self.redis.port}")
        child = supervisor.start(self.redis.spec(self.data.log("redis"), self.environ))
        return self._wait(child, self.redis.ready, SERVER_START_TIMEOUT_S, stop)

    def _start_postgres(self, supervisor: Supervisor, stop: StopRequest) -> bool:
        """Start the embedded PostgreSQL (making its cluster and database); False on a stop."""
        postgres = self.postgres
        if postgres is None:
            return True
        log = self.data.log("postgres")
        if postgres.prepare(log, self.environ, self.say):
            self.say(f"made a new PostgreSQL {postgres.version} cluster in {postgres.pgdata}")
        if stop.requested.is_set():
            return False
        self.say(f"starting PostgreSQL {postgres.version} (embedded) on {HOST}:{postgres.port}")
        child = supervisor.start(postgres.spec(log, self.environ))
        if not self._wait(child, postgres.ready, SERVER_START_TIMEOUT_S, stop):
            return False
        if postgres.ensure_database():
            self.say(f"created the database {postgres.url()}")
        return True

    def _migrate(self, settings: Settings) -> None:
        from worker import migrate

        applied = migrate.up(settings)
        self.say(
            f"migrations: applied {', '.join(applied)}"
            if applied
            else "migrations: the schema is up to date"
        )

    def _start_celery(
        self, supervisor: Supervisor, stop: StopRequest, child_env: Mapping[str, str]
    ) -> bool:
        """Start the worker, beat and Flower, and wait until each is ready; False on a stop."""
        started = [supervisor.start(spec) for spec in self._celery_specs(child_env)]
        for child in started:
            self.say(f"starting {child.name} (pid {child.pid})")
        return all(
            self._wait(child, self._ready_check(child), self.options.start_timeout, stop)
            for child in started
        )

    def _child_env(self, flower_auth: str) -> dict[str, str]:
        """The environment of every child: the user's, plus what the stack provides."""
        opts = self.options
        env = dict(self.environ)
        state = self.data.load_state()
        embedded_redis = [name for name in REDIS_DATABASES if not _given(env, name)]
        if embedded_redis:
            port = self._port(state, "redis_port", "Redis", "--redis-port", opts.redis_port)
            self.redis = EmbeddedRedis(self.data.redis, port)
            for name in embedded_redis:
                env[name] = self.redis.url(REDIS_DATABASES[name])
        if not (_given(env, "DATABASE_URL") or _given(env, "POSTGRES_HOST")):
            port = self._port(
                state, "postgres_port", "PostgreSQL", "--postgres-port", opts.postgres_port
            )
            self.postgres = EmbeddedPostgres(self.data.postgres, port)
            env["DATABASE_URL"] = self.postgres.url()
        if not _given(env, "BACKUP_SCHEDULE"):
            env["BACKUP_SCHEDULE"] = DEV_BACKUP_SCHEDULE
        if not _given(env, "BEAT_SCHEDULE_FILE"):
            env["BEAT_SCHEDULE_FILE"] = str(self.data.beat_schedule)
        if opts.beat and opts.metrics_port != 0:
            # Beat serves the metrics (worker/beat_presence.py); here on 127.0.0.1.
            self.metrics_port = self._port(
                state, "metrics_port", "metrics", "--metrics-port", opts.metrics_port
            )
            env["METRICS_PORT"] = str(self.metrics_port)
            if not _given(env, "METRICS_ADDRESS"):
                env["METRICS_ADDRESS"] = HOST
        else:
            env["METRICS_PORT"] = "0"
        self.data.save_state(state)
        # Always set, so Flower never starts without authentication.
        env["FLOWER_BASIC_AUTH"] = flower_auth
        env["PYTHONUNBUFFERED"] = "1"
        pythonpath = _pythonpath(env)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        return env

    def _port(
        self, state: dict[str, Any], key: str, what: str, option: str, explicit: int | None
    ) -> int:
        """An embedded server's port (see choose_port), recorded in ``state`` under ``key``."""
        port, note = choose_port(what, option, explicit, state.get(key), DEFAULT_PORTS[key])
        if note:
            self.say(note)
        state[key] = port
        return port

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
        """The ready block for people: what runs where, and the lines to paste elsewhere."""
        rows = self._ready_rows(env, flower_auth)
        width = max(len(r[0]) for r in rows)
        url_width = max(len(r[1]) for r in rows)
        lines = ["", f"dnd-client dev is up. Data: {self.data.root}  Logs: {self.data.logs}", ""]
        lines += [f"  {a:<{width}}  {b:<{url_width}}  {c}".rstrip() for a, b, c in rows]
        lines += [
            "",
            "In another terminal, paste these lines, then run `dnd-client backup --all`:",
            "",
        ]
        exports = self._exports(env)
        for name in URL_SETTINGS:
            if name in exports:
                lines.append(f"export {name}={shlex.quote(exports[name])}")
            elif name == "DATABASE_URL" and self.postgres is None:
                lines.append("# the database: your DATABASE_URL / POSTGRES_* settings, as here")
            else:
                lines.append(f"# {name}: yours, as set here")
        lines += [
            f"export {name}={shlex.quote(value)}"
            for name, value in exports.items()
            if name not in URL_SETTINGS
        ]
        lines += ["", READY_LINE, ""]
        return "\n".join(lines)

    def _ready_rows(self, env: Mapping[str, str], flower_auth: str) -> list[tuple[str, str, str]]:
        """(what, where, note) of every server and process, as the text shows them."""
        opts = self.options
        rows = [
            (label, redact_url(env[name]), self._redis_source(name))
            for name, label in REDIS_LABELS.items()
        ]
        rows.append(("PostgreSQL", self._database_shown(env), self._database_source()))
        if opts.flower:
            user, password = self._flower_login(flower_auth)
            shown = password if password is not None else "as in FLOWER_BASIC_AUTH"
            rows.append(("Flower", self._flower_url(), f"user {user}, password {shown}"))
        rows.append(("worker", f"dev@{socket.gethostname()}", f"concurrency {opts.concurrency}"))
        if opts.beat:
            rows.append(("beat", f"BACKUP_SCHEDULE={env['BACKUP_SCHEDULE']}", ""))
        if self.metrics_port:
            rows.append(("metrics", self._metrics_url(), "Prometheus, served by beat"))
        return rows

    def _ready_json(self, env: Mapping[str, str], flower_auth: str) -> str:
        """The ready block for programs: one JSON object, then the ready line."""
        opts = self.options
        payload: dict[str, object] = {
            "data_dir": str(self.data.root),
            "logs": str(self.data.logs),
            "redis": redact_url(env["REDIS_URL"]),
            "broker": redact_url(env["CELERY_BROKER_URL"]),
            "results": redact_url(env["CELERY_RESULT_BACKEND"]),
            "database": self._database_shown(env),
            "worker": {"name": f"dev@{socket.gethostname()}", "concurrency": opts.concurrency},
            "beat": {"schedule": env["BACKUP_SCHEDULE"]} if opts.beat else None,
            "metrics": self._metrics_url() if self.metrics_port else None,
            # URLs given in the environment are not repeated: they are yours.
            "exports": self._exports(env),
        }
        if opts.flower:
            user, password = self._flower_login(flower_auth)
            payload["flower"] = {"url": self._flower_url(), "user": user, "password": password}
        return json.dumps(payload, indent=2) + "\n" + READY_LINE + "\n"

    def _exports(self, env: Mapping[str, str]) -> dict[str, str]:
        """What a CLI in another terminal must export, by name.

        The URLs of the embedded servers, then the settings the CLI must share
        with the workers, when given here.
        """
        exports = {
            name: env[name]
            for name in URL_SETTINGS
            if not _given(self.environ, name)
            and not (name == "DATABASE_URL" and self.postgres is None)
        }
        exports.update(
            {name: self.environ[name] for name in SHARED_SETTINGS if _given(self.environ, name)}
        )
        return exports

    def _redis_source(self, name: str) -> str:
        if _given(self.environ, name):
            return f"from {name}"
        return f"embedded Redis {self.redis.version}" if self.redis else ""

    def _database_shown(self, env: Mapping[str, str]) -> str:
        if self.postgres is not None:
            return self.postgres.url()
        return redact_url(Settings.from_env(env).database_url)

    def _database_source(self) -> str:
        if self.postgres is not None:
            return f"embedded PostgreSQL {self.postgres.version}"
        return f"from {'DATABASE_URL' if _given(self.environ, 'DATABASE_URL') else 'POSTGRES_*'}"

    def _metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def _flower_url(self) -> str:
        return f"http://{HOST}:{self.options.flower_port}/"

    def _flower_login(self, flower_auth: str) -> tuple[str, str | None]:
        """Flower's user, and its password when the stack made it (one given is not shown)."""
        user, _, password = flower_auth.split(",")[0].partition(":")
        return user, None if _given(self.environ, "FLOWER_BASIC_AUTH") else password

    # -- watch ------------------------------------------------------------------

    def _watch(self, supervisor: Supervisor, stop: StopRequest) -> int:
        """Relay deaths, restart Celery's processes; returns on a stop signal or a fatal death."""
        from worker.devstack.lagline import LagReporter

        assert self.settings is not None  # set by _start
        lag = LagReporter(self.settings, self.say)
        while not stop.requested.wait(0.5):
            now = time.monotonic()
            lag.tick(now)
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
