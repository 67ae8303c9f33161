"""Flower never starts without authentication (worker/flower_guard.py).

The subprocess tests start the real `celery ... flower` command lines; the guard
stops them before Flower connects anywhere, so no service is needed (the broker
URL points at a closed port to make sure of it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker import flower_guard
from worker.exit_codes import CONFIG

REPO = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).parent / "celery")
GOOD = {"FLOWER_BASIC_AUTH": "admin:s3cret"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["celery", "-A", "worker", "flower"], True),
        (["celery", "--app", "worker", "flower", "--port=5555"], True),
        (["celery", "--app=worker", "flower"], True),
        (["celery", "-Aworker", "-b", "redis://x", "flower"], True),
        (["/venv/lib/python3.11/site-packages/celery/__main__.py", "-A", "worker", "flower"], True),
        (["/usr/local/bin/celery", "-q", "--workdir", "/srv", "flower"], True),
        (["celery", "-A", "worker", "worker"], False),
        (["celery", "-A", "worker", "beat"], False),
        (["celery", "-A", "flower", "worker"], False),  # an app named flower
        (["celery", "-A", "worker", "inspect", "ping"], False),
        (["dnd-client", "flower"], False),  # not celery
        (["-c"], False),
    ],
)
def test_is_flower(argv, expected):
    assert flower_guard.is_flower(argv) is expected


@pytest.mark.parametrize(
    ("environ", "args", "problem"),
    [
        ({}, [], "FLOWER_BASIC_AUTH=user:password"),
        ({"FLOWER_BASIC_AUTH": ""}, [], "FLOWER_BASIC_AUTH=user:password"),
        ({"FLOWER_BASIC_AUTH": "admin"}, [], "FLOWER_BASIC_AUTH must be user:password"),
        ({"FLOWER_BASIC_AUTH": "admin:"}, [], "FLOWER_BASIC_AUTH must be user:password"),
        ({"FLOWER_BASIC_AUTH": "a:b,c"}, [], "FLOWER_BASIC_AUTH must be user:password"),
        ({"FLOWER_AUTH_PROVIDER": "flower.views.auth.GithubLoginHandler"}, [], "FLOWER_AUTH "),
        ({"FLOWER_AUTH": ".*@example\\.com"}, [], "FLOWER_AUTH_PROVIDER is not"),
        ({}, ["--basic-auth="], "FLOWER_BASIC_AUTH=user:password"),
        ({}, ["--port=5555"], "FLOWER_BASIC_AUTH=user:password"),
    ],
)
def test_refused_configurations(environ, args, problem):
    found = flower_guard.auth_problem(environ, args)
    assert found is not None
    assert problem in found
    assert "s3cret" not in found


@pytest.mark.parametrize(
    ("environ", "args"),
    [
        (GOOD, []),
        ({"FLOWER_BASIC_AUTH": "admin:s3cret,ops:pass:with:colons"}, []),
        ({"FLOWER_AUTH": ".*@example\\.com", "FLOWER_AUTH_PROVIDER": "x.Handler"}, []),
        ({}, ["--basic-auth=admin:s3cret"]),
        ({}, ["--basic_auth=admin:s3cret"]),
        ({}, ["--auth=.*@example\\.com"]),
    ],
)
def test_accepted_configurations(environ, args):
    assert flower_guard.auth_problem(environ, args) is None


def test_opt_out_starts_open_with_a_warning(capsys):
    argv = ["celery", "-A", "worker", "flower"]
    flower_guard.check(argv, {"FLOWER_ALLOW_NO_AUTH": "1"})
    assert "WARNING: running without authentication" in capsys.readouterr().err
    # The opt-out covers no authentication at all, never a half-made one.
    with pytest.raises(SystemExit) as exit_:
        flower_guard.check(argv, {"FLOWER_ALLOW_NO_AUTH": "1", "FLOWER_AUTH_PROVIDER": "x.H"})
    assert exit_.value.code == CONFIG
    with pytest.raises(SystemExit):
        flower_guard.check(argv, {"FLOWER_ALLOW_NO_AUTH": "0"})
    flower_guard.check(["celery", "-A", "worker", "worker"], {})  # not Flower: no check
    flower_guard.check([*argv, "--help"], {})  # Flower's help serves nothing


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "CELERY_"))}
    # A closed port: if the guard let Flower through, it could not start anyway.
    return {**env, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0", **extra}


@pytest.mark.parametrize(
    "argv",
    [
        [CELERY, "-A", "worker", "flower"],
        [CELERY, "--app", "worker", "flower", "--port=5599"],
        [CELERY, "--app=worker", "flower"],
        [sys.executable, "-m", "celery", "-A", "worker", "flower", "--port=5599"],
    ],
)
def test_flower_command_refuses_to_start_without_auth(argv):
    done = subprocess.run(
        argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == CONFIG, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("celery flower: refusing to start:")
    assert "FLOWER_BASIC_AUTH" in line
    assert "FLOWER_ALLOW_NO_AUTH=1" in line


def test_flower_started_through_celerys_click_group_is_caught():
    # sys.argv says nothing of Flower here: only click's context knows.
    code = (
        "import sys; sys.argv = ['launcher']; from celery.bin.celery import celery; "
        "celery.main(args=['-A', 'worker', 'flower'], prog_name='celery')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == CONFIG, done.stderr
    assert "FLOWER_BASIC_AUTH" in done.stderr


def test_malformed_auth_is_refused_without_echoing_it():
    done = subprocess.run(
        [CELERY, "-A", "worker", "flower"],
        cwd=REPO,
        env=_env(FLOWER_BASIC_AUTH="admin-s3cret"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == CONFIG
    assert "FLOWER_BASIC_AUTH must be user:password" in done.stderr
    assert "s3cret" not in done.stderr
