"""deploy/systemd: the units pass `systemd-analyze verify` and run real commands.

verify needs the binaries of ExecStart= to exist: the units are copied to a
temporary directory with /opt/dnd-client/venv/bin/ pointed at this virtualenv's
bin/ (the only change). verify exits 0 even on an unknown key or a bad value
("..., ignoring"), so every line it prints about our units fails the test;
lines about the host's own units are not ours to judge.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.compose import dotenv
from tests.deploy_checks import check_command, unknown_variables
from worker.celery_config import build_config, consumed_queues
from worker.secret_files import SECRET_VARIABLES
from worker.settings import Settings
from worker.tls import tls_warning

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
VENV_BIN = "/opt/dnd-client/venv/bin/"
UNITS = ("dnd-migrate.service", "dnd-worker@.service", "dnd-beat.service", "dnd-flower.service")
LONG_RUNNING = UNITS[1:]
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (a key may repeat, e.g. EnvironmentFile=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None
        assert sep, f"{path.name}: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def verify(unit_dir: Path, names: list[str]) -> list[str]:
    """`systemd-analyze verify`'s complaints about our units."""
    analyze = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    assert Path(analyze).exists(), "systemd-analyze is needed to test deploy/systemd"
    done = subprocess.run(
        [analyze, "verify", "--man=no", *(str(unit_dir / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (done.stdout + done.stderr).splitlines()
    ours = [line for line in output if "dnd-" in line or str(unit_dir) in line]
    if done.returncode != 0 and not ours:
        ours = output or [f"exit status {done.returncode}"]
    return ours


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert VENV_BIN in text
        bin_dir = str(Path(sys.executable).parent) + "/"
        (tmp_path / name).write_text(text.replace(VENV_BIN, bin_dir))
    return tmp_path


def test_units_pass_systemd_analyze_verify(unit_dir):
    # The template as an instance, as `systemctl start dnd-worker@1` loads it.
    names = [n for n in UNITS if "@." not in n] + ["dnd-worker@1.service"]
    assert verify(unit_dir, names) == []


def test_verify_reports_a_broken_unit(unit_dir):
    # The filter above must not hide real errors: a misspelt key and a bad value.
    text = (unit_dir / "dnd-beat.service").read_text()
    broken = text.replace("TimeoutStopSec=", "TimeoutStpoSec=").replace(
        "Restart=on-failure", "Restart=sometimes"
    )
    (unit_dir / "dnd-beat.service").write_text(broken)
    complaints = "\n".join(verify(unit_dir, ["dnd-beat.service"]))
    assert "TimeoutStpoSec" in complaints
    assert "sometimes" in complaints


def test_dependencies_and_lifecycle():
    units = {name: parse_unit(SYSTEMD / name) for name in UNITS}
    migrate = units["dnd-migrate.service"]["Service"]
    assert migrate["Type"] == ["oneshot"]
    assert migrate["RemainAfterExit"] == ["yes"]
    for name in LONG_RUNNING:
        unit, service = units[name]["Unit"], units[name]["Service"]
        assert "dnd-migrate.service" in unit["Requires"][0].split(), name
        assert "dnd-migrate.service" in unit["After"][0].split(), name
        assert service["Restart"] == ["on-failure"], name
        assert units[name]["Install"]["WantedBy"] == ["multi-user.target"], name
    worker = units["dnd-worker@.service"]["Service"]
    assert " -n worker%i@%H " in f" {worker['ExecStart'][0]} "
    # Warm shutdown: SIGTERM to the main process only, time for the longest task.
    assert worker["KillSignal"] == ["SIGTERM"]
    assert worker["KillMode"] == ["mixed"]
    assert int(worker["TimeoutStopSec"][0]) > Settings().task_time_limit_s
    assert "-/etc/dnd-client/worker-%i.env" in worker["EnvironmentFile"]


def test_units_are_hardened_and_unprivileged():
    for name in UNITS:
        service = parse_unit(SYSTEMD / name)["Service"]
        assert service["User"][0] not in ("root", "0"), name
        assert "/etc/dnd-client/dnd-client.env" in service["EnvironmentFile"], name
        for key, value in HARDENING.items():
            assert service.get(key) == [value], f"{name}: {key}={value}"


def test_every_command_is_one_our_programs_accept():
    for name in UNITS:
        [command] = parse_unit(SYSTEMD / name)["Service"]["ExecStart"]
        assert command.startswith(VENV_BIN), name
        # systemd's specifiers, as for instance 1 on host "web1".
        argv = command.replace("%i", "1").replace("%H", "web1").split()
        check_command([Path(argv[0]).name, *argv[1:]])


# What an operator puts in /etc/dnd-client/credentials/ (README.md), as placeholders.
CREDENTIALS = {
    "database_url": "postgresql://dnd:CHANGE-ME@postgres.internal:5432/dnd_client"
    "?sslmode=verify-full&sslrootcert=/etc/dnd-client/tls/postgres-ca.pem",
    "redis_url": "rediss://:CHANGE-ME@redis.internal:6380/0"
    "?ssl_ca_certs=/etc/dnd-client/tls/redis-ca.pem",
    "celery_broker_url": "rediss://:CHANGE-ME@redis.internal:6380/1",
    "celery_result_backend": "rediss://:CHANGE-ME@redis.internal:6380/2",
    "flower_basic_auth": "admin:CHANGE-ME",
}


def _credential_environment(name: str, directory: Path) -> dict[str, str]:
    """The unit's Environment= *_FILE variables, with %d (its credentials) at ``directory``."""
    service = parse_unit(SYSTEMD / name)["Service"]
    loaded = {}
    for item in service.get("LoadCredential", []):
        credential, _, source = item.partition(":")
        assert source == f"/etc/dnd-client/credentials/{credential}", (name, item)
        loaded[credential] = source
    env = {}
    for item in service.get("Environment", []):
        key, _, value = item.partition("=")
        if key.endswith("_FILE") and value.startswith("%d/"):
            credential = value.removeprefix("%d/")
            assert credential in loaded, f"{name}: {key} names a credential it does not load"
            (directory / credential).write_text(CREDENTIALS[credential] + "\n")
            env[key] = str(directory / credential)
    return env


def test_passwords_come_from_credentials_never_from_the_environment_file(tmp_path):
    shared = dotenv(SYSTEMD / "dnd-client.env.example")
    assert not {*SECRET_VARIABLES, "POSTGRES_PASSWORD"} & set(shared)
    assert not [value for value in shared.values() if "@" in value]  # no user:password@
    needs = {
        "dnd-migrate.service": {"DATABASE_URL"},
        "dnd-worker@.service": {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL",
                                "CELERY_RESULT_BACKEND"},
        "dnd-beat.service": {"CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"},
        "dnd-flower.service": {"CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "FLOWER_BASIC_AUTH"},
    }  # fmt: skip
    for name, variables in needs.items():
        env = _credential_environment(name, tmp_path)
        assert {key.removesuffix("_FILE") for key in env} == variables, name
        settings = Settings.from_env({**shared, **env})
        assert tls_warning(settings) is None, name  # the examples check every certificate
        if "DATABASE_URL" in variables:
            assert "sslmode=verify-full" in settings.database_url


def test_environment_files_are_valid_settings(tmp_path):
    shared = dotenv(SYSTEMD / "dnd-client.env.example")
    instance = dotenv(SYSTEMD / "worker-1.env.example")
    assert unknown_variables(sorted({*shared, *instance})) == []
    credentials = _credential_environment("dnd-worker@.service", tmp_path)
    settings = Settings.from_env({**shared, **instance, **credentials})
    build_config(settings)
    # The queues an instance is told to consume exist.
    queues = instance["CELERY_WORKER_QUEUES"].split(",")
    assert set(queues) <= set(consumed_queues(settings))
    assert int(instance["CELERY_WORKER_CONCURRENCY"]) >= 1
