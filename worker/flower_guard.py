"""Never serve Flower without authentication.

Flower runs as `celery -A worker flower`, so it loads our app: worker.celery
calls :func:`check` at import, and when the command being started is Flower
and no authentication is configured, the process stops with one line on
stderr before Flower opens its port.

Authentication counts as configured when one of these is set:

- ``FLOWER_BASIC_AUTH=user:password[,user2:password2]`` (Flower reads it natively),
  or ``FLOWER_BASIC_AUTH_FILE``, a file holding that value (Docker / Kubernetes
  secrets): the guard reads it and hands it to Flower as ``FLOWER_BASIC_AUTH``
  in this process's environment, before Flower reads its options;
- ``FLOWER_AUTH`` (a regex of allowed e-mails) with ``FLOWER_AUTH_PROVIDER``
  (Flower's OAuth; ``FLOWER_AUTH_PROVIDER`` alone protects nothing);
- the same as Flower command-line flags (``--basic-auth=...``, ``--auth=...``).

A ``flowerconfig.py`` is not read here: use the environment. ``FLOWER_ALLOW_NO_AUTH=1``
starts Flower open to anyone who can reach its port (dangerous; a laptop only).

This module reads ``os.environ`` itself (worker.settings owns the app's settings;
these are Flower's own variables, read by Flower too).

Its place in the layers (tests/unit/test_layers.py): a bottom module, importing
only the standard library, click, worker.exit_codes and worker.secret_files. The app layer
(worker.celery) imports it and calls :func:`check` at import: Celery imports the
app named by ``-A`` before it runs the ``flower`` subcommand, so that import is
the first of our code to run and comes before Flower opens its port. The dev
stack (worker.devstack) uses :func:`auth_problem` to check the credentials it
hands to Flower.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import click

from worker.exit_codes import CONFIG
from worker.secret_files import SecretFileError, resolve_secret

ALLOW_VARIABLE = "FLOWER_ALLOW_NO_AUTH"
AUTH_VARIABLES = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH", "FLOWER_AUTH_PROVIDER")
BASIC_AUTH = "FLOWER_BASIC_AUTH"
# Celery's global options that take a value: `celery -A worker flower`,
# `celery --app worker flower`, `celery --app=worker -b URL flower`.
_VALUE_OPTIONS = frozenset(
    {"-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config", "--workdir"}
)
_TRUE = frozenset({"1", "true", "yes", "on"})


def subcommand_index(argv: Sequence[str]) -> int | None:
    """Where the celery subcommand is in ``argv`` (``sys.argv`` of `celery`, `python -m celery`)."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUE_OPTIONS:
            i += 2
            continue
        if arg == "--":
            return i + 1 if i + 1 < len(argv) else None
        if not arg.startswith("-"):
            return i
        i += 1
    return None


def is_flower(argv: Sequence[str]) -> bool:
    """True when this process is `celery ... flower`, however it was spelled."""
    # Celery imports the app in its command group's callback, where click
    # already knows the subcommand: exact whatever the option syntax.
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.command.name == "celery" and ctx.invoked_subcommand == "flower":
        return True
    # The command line as well, so that a change in how Celery loads the app
    # makes the guard stricter, never silently absent.
    program = Path(argv[0]) if argv else Path()
    is_celery = program.name == "celery" or program.parent.name == "celery"
    at = subcommand_index(argv)
    return is_celery and at is not None and argv[at] == "flower"


def auth_problem(environ: Mapping[str, str], flower_args: Sequence[str] = ()) -> str | None:
    """Why Flower must not start with this configuration (the opt-out aside); None if it may."""
    flags = {
        arg.lstrip("-").partition("=")[0].replace("-", "_")
        for arg in flower_args
        if "=" in arg and arg.partition("=")[2].strip()
    }
    basic = environ.get("FLOWER_BASIC_AUTH", "").strip()
    if basic:
        entries = [entry.partition(":") for entry in basic.split(",")]
        if all(user.strip() and sep and password for user, sep, password in entries):
            return None
        # Never echo the value: it holds passwords.
        return (
            "FLOWER_BASIC_AUTH must be user:password (several separated by commas), "
            "with a user and a password in each"
        )
    auth = environ.get("FLOWER_AUTH", "").strip()
    provider = environ.get("FLOWER_AUTH_PROVIDER", "").strip()
    if auth and provider:
        return None
    if provider and not auth:
        return (
            "FLOWER_AUTH_PROVIDER is set but FLOWER_AUTH (the regex of allowed e-mails) "
            "is not: Flower would run without authentication"
        )
    if auth and not provider:
        return "FLOWER_AUTH is set but FLOWER_AUTH_PROVIDER is not: set both for OAuth"
    if "basic_auth" in flags or "auth" in flags:
        return None
    return (
        f"Flower needs authentication: set FLOWER_BASIC_AUTH=user:password "
        f"(or FLOWER_AUTH and FLOWER_AUTH_PROVIDER for OAuth); "
        f"{ALLOW_VARIABLE}=1 starts it open to anyone who can reach its port (dangerous)"
    )


def check(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Exit with one line on stderr if this process is Flower and would run without auth."""
    argv = sys.argv if argv is None else argv
    if not is_flower(argv):
        return
    at = subcommand_index(argv)
    flower_args = argv[at + 1 :] if at is not None else ()
    if "--help" in flower_args:  # prints Flower's options and exits: nothing is served
        return
    env = _basic_auth_from_file(os.environ if environ is None else environ)
    problem = auth_problem(env, flower_args)
    if problem is None:
        return
    # The opt-out covers "no authentication at all", never a half-made one.
    half_made = any(env.get(name, "").strip() for name in AUTH_VARIABLES)
    if not half_made and env.get(ALLOW_VARIABLE, "").strip().lower() in _TRUE:
        print(
            f"celery flower: WARNING: running without authentication ({ALLOW_VARIABLE} is set)",
            file=sys.stderr,
        )
        return
    print(f"celery flower: refusing to start: {problem}", file=sys.stderr)
    sys.exit(CONFIG)


def _basic_auth_from_file(env: Mapping[str, str]) -> Mapping[str, str]:
    """Read FLOWER_BASIC_AUTH_FILE into FLOWER_BASIC_AUTH, where Flower looks for it.

    ``env`` is changed in place when it is ``os.environ`` (Flower reads its
    options from there after this check); any other mapping is copied.
    """
    try:
        value = resolve_secret(env, BASIC_AUTH)
    except SecretFileError as exc:
        print(f"celery flower: refusing to start: {exc}", file=sys.stderr)
        sys.exit(CONFIG)
    if value is None or not env.get(BASIC_AUTH + "_FILE", "").strip():
        return env
    if env is os.environ:
        os.environ[BASIC_AUTH] = value
        return env
    return {**env, BASIC_AUTH: value}
