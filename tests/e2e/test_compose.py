"""docker-compose.yml, Dockerfile and .env.example, tested without a Docker engine.

Our four services (migrate, worker, beat, flower) run NATIVELY here: each
service's command, as written in the compose file, with the service's
environment as compose would give it (substituted from .env.example), started
from this virtualenv's console scripts. What the test changes, and only that:

- redis:6379 and postgres:5432 become the test servers (with their credentials
  and a database of this test's own);
- Celery queue/key prefixes and the data key prefix are this test's own, so
  concurrent runs never mix;
- beat's state directory (a volume in compose) is a temporary one, and
  Flower's port is a free one (the container's port is checked against the
  compose file instead).
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import psycopg
import pytest

from tests import compose
from tests.conftest import delete_prefix
from tests.deploy_checks import check_command, shell_words, unknown_variables
from tests.e2e.conftest import wait_for
from tests.processes import REPO, run_python
from worker.celery_config import build_config
from worker.secret_files import SECRET_VARIABLES
from worker.settings import Settings

SECRETS_MOUNT = "/run/secrets/"

OUR_SERVICES = ("migrate", "worker", "beat", "flower")
MAKE_SECRETS = REPO / "deploy" / "compose" / "make-secrets.sh"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return compose.load()


@pytest.fixture(scope="module")
def config(raw: dict[str, Any]) -> dict[str, Any]:
    """The compose file as `docker compose config` shows it with .env.example as .env."""
    return dict(compose.interpolate_all(raw, compose.dotenv()))


@pytest.fixture(scope="module")
def services(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config["services"])


@pytest.fixture(scope="module")
def secret_files(raw: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Compose's secrets, made by deploy/compose/make-secrets.sh: name -> the file."""
    folder = tmp_path_factory.mktemp("compose") / "secrets"
    done = subprocess.run(
        ["/bin/sh", str(MAKE_SECRETS), str(folder)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = compose.interpolate_all(raw, {**compose.dotenv(), "DND_SECRETS_DIR": str(folder)})
    return {name: Path(secret["file"]) for name, secret in config["secrets"].items()}


def _with_secret_files(env: dict[str, str], secret_files: dict[str, Path]) -> dict[str, str]:
    """``env`` with /run/secrets/<name> (where compose mounts them) pointing at the files."""
    return {
        key: str(secret_files[value.removeprefix(SECRETS_MOUNT)])
        if value.startswith(SECRETS_MOUNT)
        else value
        for key, value in env.items()
    }


# -- the file itself ---------------------------------------------------------------


def test_services_are_laid_out_for_production(config, services):
    assert set(services) == {"redis", "postgres", *OUR_SERVICES}
    images = {services[name]["image"] for name in OUR_SERVICES}
    assert len(images) == 1, f"one image for all our services, got {images}"
    assert all(services[name]["build"] == "." for name in OUR_SERVICES)
    for name in ("redis", "postgres"):
        assert "healthcheck" in services[name]
        [volume] = services[name]["volumes"]
        assert volume.split(":")[0] in config["volumes"], f"{name}: not a named volume"
    assert services["redis"]["image"].startswith("redis:")
    assert services["postgres"]["image"].startswith("postgres:")

    assert services["migrate"]["command"] == ["dnd-client", "migrate", "up"]
    for name in ("worker", "beat", "flower"):
        after = services[name]["depends_on"]["migrate"]["condition"]
        assert after == "service_completed_successfully", name
    # `docker compose up --scale worker=4`: nothing that must be unique.
    assert "container_name" not in services["worker"]
    assert "ports" not in services["worker"]
    assert "celery@$HOSTNAME" in " ".join(services["worker"]["healthcheck"]["test"])
    # Warm shutdown may take as long as the longest task.
    grace = services["worker"]["stop_grace_period"]
    assert grace.endswith("s")
    assert int(grace[:-1]) > Settings().task_time_limit_s
    assert services["migrate"]["restart"] == "no"
    # Beat: exactly one, never several.
    assert services["beat"].get("deploy", {}).get("replicas", 1) == 1
    assert "container_name" not in services["beat"]


def test_every_variable_is_documented(raw):
    example = compose.dotenv()
    # Every variable the compose file uses is documented in .env.example, and
    # .env.example documents nothing the compose file ignores.
    used = compose.referenced_variables(raw)
    assert sorted(used - set(example)) == []
    assert sorted(set(example) - used) == []


def test_passwords_are_files_never_environment_variables(raw, services, secret_files):
    # Nothing secret in .env: every password is a file compose mounts.
    assert not [name for name in compose.dotenv() if "PASSWORD" in name or "AUTH" in name]
    made = {path.name for path in next(iter(secret_files.values())).parent.iterdir()}
    assert made == {path.name for path in secret_files.values()}, "make-secrets.sh makes them all"
    for path in secret_files.values():
        assert path.read_text().strip(), path
        assert path.stat().st_mode & 0o777 == 0o644  # the containers' users read their mounts
    assert next(iter(secret_files.values())).parent.stat().st_mode & 0o777 == 0o700
    for name, service in services.items():
        env = compose.environment(service)
        secret_names = set(service.get("secrets", []))
        assert not {*SECRET_VARIABLES, "REDIS_PASSWORD", "REDISCLI_AUTH"} & set(env), name
        for key, value in env.items():
            if value.startswith(SECRETS_MOUNT):
                assert key.endswith("_FILE"), (name, key)
                assert value.removeprefix(SECRETS_MOUNT) in secret_names, (name, key)
            assert "CHANGE-ME" not in value, (name, key)
        assert secret_names <= set(secret_files), name
    for name in OUR_SERVICES:
        assert services[name]["secrets"], name


def test_every_environment_variable_is_read_by_someone(raw, services, secret_files):
    names = sorted(
        {name for service in raw["services"].values() for name in compose.environment(service)}
    )
    assert unknown_variables(names) == []
    # And what each of our services gets is a valid configuration of ours.
    for name in OUR_SERVICES:
        env = _with_secret_files(compose.environment(services[name]), secret_files)
        build_config(Settings.from_env(env))


def test_commands_and_healthchecks_are_valid(services):
    for name in OUR_SERVICES:
        check_command(services[name]["command"])
    check_command(shell_words(services["worker"]["healthcheck"]["test"][1]))
    flower = services["flower"]
    [mapping] = flower["ports"]
    assert mapping.rsplit(":", 1)[1] == "5555"
    assert "--port=5555" in flower["command"]
    assert "127.0.0.1:5555/healthcheck" in " ".join(flower["healthcheck"]["test"])


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    plugin = (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False, timeout=30
        ).returncode
        == 0
    )
    if not plugin:
        pytest.skip(
            "the docker compose plugin is missing here: `docker compose config` "
            "cannot run (the other tests of this module check the file)"
        )
    assert docker
    done = subprocess.run(
        [docker, "compose", "--env-file", str(compose.ENV_EXAMPLE), "config", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# -- the Dockerfile ----------------------------------------------------------------


def test_dockerfile_builds_from_what_the_context_holds(tmp_path):
    lines = [
        line.strip()
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("RUN pip install ") for line in lines)
    assert not any("[dev]" in line or "[test]" in line for line in lines)
    cmd = next(line for line in lines if line.startswith("CMD "))
    check_command(json.loads(cmd.removeprefix("CMD ")))

    # The build context: only what .dockerignore lets through (a whitelist).
    allowed = [
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    assert ".env" not in allowed
    src = tmp_path / "src"
    for line in lines:
        if line.startswith("COPY "):
            *sources, _dest = line.split()[1:]
            for source in sources:
                assert source in allowed, f"{source} is not in the build context"
                path = REPO / source
                target = src / source
                if path.is_dir():
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target)
    # What `pip install .` does in the image: build the wheel from those files.
    # (Without build isolation when hatchling is at hand: no download needed.)
    args = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--quiet",
        "-w",
        str(tmp_path / "dist"),
        str(src),
    ]
    if importlib.util.find_spec("hatchling") is not None:
        args.insert(4, "--no-build-isolation")
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert "worker/celery.py" in names
    assert "worker/flower_guard.py" in names
    assert any(n.startswith("worker/_migrations/") and n.endswith(".sql") for n in names)
    assert "dnd-client = worker.cli.main:main" in scripts


# -- the services, run natively --------------------------------------------------


class Service:
    """One of our compose services as a native process, in a process group of its own."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / argv[0]), *argv[1:]],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and text not in self.log():
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            return text in self.log()

        wait_for(seen, timeout, message=f"{self.name} to log {text!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def _compose_redis_db(value: str) -> str | None:
    """The database (URL path) of a URL to compose's `redis` service; None for any other value."""
    parts = urlsplit(value) if "://" in value else None
    return parts.path if parts and parts.hostname == "redis" else None


def _as_here(key: str, value: str, pg: SplitResult, test_redis: SplitResult, tmp: Path) -> str:
    """One value of a compose service's environment, pointed at this test's servers and files."""
    if _compose_redis_db(value) is not None:
        return urlunsplit(
            urlsplit(value)._replace(scheme=test_redis.scheme, netloc=test_redis.netloc)
        )
    if key == "POSTGRES_HOST":
        assert value == "postgres:5432"
        return f"{pg.hostname}:{pg.port or 5432}"
    postgres = {
        "POSTGRES_USER": pg.username or "postgres",
        "POSTGRES_PASSWORD": pg.password or "",
        "POSTGRES_DBNAME": pg.path.lstrip("/"),
    }
    if key in postgres:
        return postgres[key]
    if value.startswith("/var/lib/dnd-client/"):
        return str(tmp / value.rsplit("/", 1)[1])
    return value


def _base_env() -> dict[str, str]:
    """What the image's environment has before compose adds the service's own."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    }
    env["PYTHONUNBUFFERED"] = "1"
    # As in the image, where pip put the console scripts on PATH.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}"
    return env


@pytest.fixture
def native(
    services, celery_env, redis_server_url, tmp_path, secret_files
) -> Iterator[Callable[..., Any]]:
    """native(service, database_url) -> (argv, env): a compose service as run here."""
    test_redis = urlsplit(redis_server_url)
    used_dbs: set[str] = set()

    def build(name: str, database_url: str, port: int | None = None) -> tuple[list[str], dict]:
        service = services[name]
        env = _base_env()
        pg = urlsplit(database_url)
        for key, value in _with_secret_files(compose.environment(service), secret_files).items():
            if key.endswith("_FILE") and value in map(str, secret_files.values()):
                # A URL in a secret file points at compose's `redis`: here, the test's.
                content = Path(value).read_text().strip()
                used_dbs.update(filter(None, [_compose_redis_db(content)]))
                here = _as_here(key.removesuffix("_FILE"), content, pg, test_redis, tmp_path)
                # The test server's password; none (trust): the generated one, unused.
                if here and here != content:
                    value = str(tmp_path / f"here-{key.lower()}")
                    Path(value).write_text(here + "\n")
                env[key] = value
                continue
            used_dbs.update(filter(None, [_compose_redis_db(value)]))
            env[key] = _as_here(key, value, pg, test_redis, tmp_path)
        assert "DATABASE_URL" not in env  # compose configures PostgreSQL by POSTGRES_*
        for key in ("CELERY_QUEUE_PREFIX", "CELERY_KEY_PREFIX", "REDIS_KEY_PREFIX"):
            env[key] = celery_env[key]
        argv = list(service["command"])
        if port is not None:
            argv = [f"--port={port}" if arg == "--port=5555" else arg for arg in argv]
        return argv, env

    yield build
    # Celery's keys in the compose file's other Redis databases (db 1 and 2).
    for path in used_dbs:
        delete_prefix(urlunsplit(test_redis._replace(path=path)), celery_env["CELERY_KEY_PREFIX"])


@pytest.fixture
def start(tmp_path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def run(name: str, argv: list[str], env: dict[str, str]) -> Service:
        service = Service(name, argv, env, tmp_path)
        started.append(service)
        return service

    yield run
    for service in reversed(started):
        service.stop()


def test_migrate_service_migrates_an_empty_database(native, empty_database_url):
    argv, env = native("migrate", empty_database_url)

    def migrate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / argv[0]), *argv[1:]],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    first = migrate()
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stderr
    with psycopg.connect(empty_database_url) as conn:
        tables = {
            row[0]
            for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    assert {"client_sessions", "client_messages", "persistence_snapshots"} <= tables
    # `docker compose up` runs it on every start: a second run changes nothing.
    again = migrate()
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stderr


def _healthcheck(env: dict[str, str], command: str, **extra: str) -> int:
    return subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=REPO,
        env={**env, **extra},
        capture_output=True,
        timeout=60,
        check=False,
    ).returncode


def test_worker_service_becomes_ready_and_healthy(native, start, database_url, services):
    argv, env = native("worker", database_url)
    worker = start("worker", argv, env)
    worker.wait_for_log("ready.")
    # CELERY_WORKER_CONCURRENCY from the compose file is honoured by Celery's CLI.
    assert f"concurrency: {env['CELERY_WORKER_CONCURRENCY']} (prefork)" in worker.log()
    assert f"{env['CELERY_QUEUE_PREFIX']}shard.7" in worker.log()
    # The healthcheck, as compose runs it inside the container, where HOSTNAME
    # is the container's host name and so the worker's node name.
    check = services["worker"]["healthcheck"]["test"][1]
    assert _healthcheck(env, check, HOSTNAME=socket.gethostname()) == 0
    # ...and it fails for a node that is not there (shorter wait for the test).
    assert "--timeout 10" in check
    assert (
        _healthcheck(env, check.replace("--timeout 10", "--timeout 2"), HOSTNAME="no-such-host")
        != 0
    )


def test_beat_service_starts(native, start, database_url):
    argv, env = native("beat", database_url)
    beat = start("beat", argv, env)
    beat.wait_for_log("beat: Starting")
    assert beat.proc.poll() is None
    assert Path(env["BEAT_SCHEDULE_FILE"]).parent.exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, path: str, auth: str | None = None) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path: (status, body); (0, "") while nothing listens."""
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    except OSError:
        return 0, ""
    finally:
        conn.close()


def test_flower_service_requires_auth_and_shows_workers_and_tasks(
    native, start, database_url, services
):
    worker_argv, worker_env = native("worker", database_url)
    worker = start("worker", worker_argv, worker_env)
    port = _free_port()
    argv, env = native("flower", database_url, port=port)
    # Flower's login comes from the secret file, through the guard (flower_guard).
    assert "FLOWER_BASIC_AUTH" not in env
    auth = Path(env["FLOWER_BASIC_AUTH_FILE"]).read_text().strip()
    assert auth.startswith("admin:")
    flower = start("flower", argv, env)
    wait_for(
        lambda: _get(port, "/healthcheck")[0] == 200 or flower.proc.poll() is not None,
        30,
        message="Flower to answer",
    )
    assert flower.proc.poll() is None, flower.log()
    worker.wait_for_log("ready.")

    assert _get(port, "/")[0] == 401
    assert _get(port, "/", "admin:wrong-password")[0] == 401
    for path in ("/workers", "/tasks", "/api/workers"):
        assert _get(port, path)[0] == 401, path
    assert _get(port, "/", auth)[0] == 200
    node = f"celery@{socket.gethostname()}"
    wait_for(
        lambda: node in _get(port, "/api/workers?refresh=1", auth)[1],
        30,
        message=f"Flower to list {node}",
    )

    # A task run by the worker shows in Flower (task events are on).
    sid = str(uuid.uuid4())
    task_id = run_python(
        worker_env,
        f"""
import json
from worker.tasks import backup_session
result = backup_session.delay({sid!r})
result.get(timeout=60)
print(json.dumps(result.id))
""",
    )
    tasks = wait_for(
        lambda: json.loads(_get(port, "/api/tasks", auth)[1] or "{}"),
        30,
        message="Flower to list the task",
    )
    assert tasks[task_id]["name"] == "worker.tasks.backup_session"

    # Measured and documented (docs/operations.md): /metrics and /healthcheck
    # answer WITHOUT credentials even when basic auth is on.
    status, metrics = _get(port, "/metrics")
    assert status == 200
    assert f'flower_worker_online{{worker="{node}"}} 1.0' in metrics
    assert _get(port, "/healthcheck") == (200, "OK")
    assert _get(port, "/metrics", auth)[0] == 200

    # The compose healthcheck of Flower, pointed at this Flower's port.
    check = services["flower"]["healthcheck"]["test"]
    assert check[0] == "CMD"
    command = [arg.replace("127.0.0.1:5555", f"127.0.0.1:{port}") for arg in check[1:]]
    assert (
        subprocess.run(
            [str(BIN / command[0]), *command[1:]], env=env, timeout=30, check=False
        ).returncode
        == 0
    )
