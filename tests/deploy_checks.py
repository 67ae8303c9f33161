"""Checks shared by the tests of docker-compose.yml and deploy/: commands and variables.

A command written in a deployment file must be one the installed programs accept:
it is parsed by the programs' own command-line parsers (click for `dnd-client`
and `celery`, tornado's option list for Flower's flags), so a typo in an option,
a subcommand or a choice fails here rather than in production.

An environment variable set in a deployment file must be read by someone: by
this project (its name appears quoted in worker/), or it is one of Celery's
(its CLI reads CELERY_<COMMAND>_<OPTION>), Flower's (FLOWER_<OPTION>) or the
official PostgreSQL/Redis images' own.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

REPO = Path(__file__).resolve().parent.parent
# Variables of the official images (postgres, redis) that our files may set.
IMAGE_VARIABLES = frozenset(
    {
        "POSTGRES_USER",
        "POSTGRES_PASSWORD",
        "POSTGRES_PASSWORD_FILE",  # the image reads the password from a file too
        "POSTGRES_DB",
        "POSTGRES_INITDB_ARGS",
        "PGDATA",
        "REDISCLI_AUTH",  # redis-cli reads the password from it (redis healthcheck)
    }
)


@functools.cache
def _project_source() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "worker").rglob("*.py")))


def read_by_project(name: str) -> bool:
    """True when the package reads ``name`` (it appears quoted in worker/, or is <SECRET>_FILE)."""
    from worker.secret_files import SECRET_VARIABLES, SUFFIX

    if name.endswith(SUFFIX) and name.removesuffix(SUFFIX) in SECRET_VARIABLES:
        return True
    return f'"{name}"' in _project_source()


@functools.cache
def celery_cli_variables() -> frozenset[str]:
    """CELERY_<COMMAND>_<OPTION>: Celery's CLI runs with click's auto_envvar_prefix."""
    from celery.bin.celery import celery

    names = {f"CELERY_{p.name.upper()}" for p in celery.params if p.name}
    for command_name, command in celery.commands.items():
        names |= {
            f"CELERY_{command_name.upper()}_{p.name.upper()}"
            for p in command.params
            if isinstance(p, click.Option) and p.name
        }
    return frozenset(names)


@functools.cache
def flower_options() -> frozenset[str]:
    import flower.options  # noqa: F401  (defines Flower's tornado options)
    from tornado.options import options

    return frozenset(name.replace("-", "_") for name in options._options)


def flower_variables() -> frozenset[str]:
    return frozenset(f"FLOWER_{name.upper()}" for name in flower_options())


def unknown_variables(names: Sequence[str]) -> list[str]:
    """The names no program of ours reads."""
    return [
        name
        for name in names
        if not (
            read_by_project(name)
            or name in celery_cli_variables()
            or name in flower_variables()
            or name in IMAGE_VARIABLES
        )
    ]


def check_command(argv: Sequence[str]) -> None:
    """Fail unless ``argv`` is a command our programs accept, options included."""
    program = Path(argv[0]).name
    if program == "dnd-client":
        from worker.cli.main import cli

        _parse(cli, "dnd-client", list(argv[1:]), obj=None)
    elif program == "celery":
        _check_celery(list(argv[1:]))
    else:
        raise AssertionError(f"not one of our programs (dnd-client, celery): {list(argv)}")


def _check_celery(args: list[str]) -> None:
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery

    from worker.celery import app

    ctx = celery.make_context("celery", args)
    assert ctx.params["app"] == "worker", f"celery must load our app (-A worker): {args}"
    ctx.obj = CLIContext(app=app, no_color=True, workdir=None, quiet=True)
    name, command, rest = celery.resolve_command(ctx, _remaining(ctx))
    assert command is not None
    assert name is not None
    sub = command.make_context(name, rest, parent=ctx)
    if name == "flower":
        for arg in sub.params["tornado_argv"]:
            option = arg.lstrip("-").partition("=")[0].replace("-", "_")
            assert arg.startswith("--"), f"Flower options are --name=value: {arg!r}"
            assert "=" in arg, f"Flower options are --name=value: {arg!r}"
            assert option in flower_options(), f"not a Flower option: {arg!r}"
    if name in ("inspect", "control"):
        assert hasattr(app.control.inspect(), sub.params["command"]), (
            f"no such {name} command: {sub.params['command']!r}"
        )


def _parse(group: click.Group, name: str, args: list[str], obj: Any) -> None:
    ctx = group.make_context(name, args, obj=obj)
    rest = _remaining(ctx)
    sub_name, command, rest = group.resolve_command(ctx, rest)
    assert command is not None
    assert sub_name is not None
    if isinstance(command, click.Group):
        _parse(command, sub_name, rest, obj)
    else:
        command.make_context(sub_name, rest, parent=ctx)


def _remaining(ctx: click.Context) -> list[str]:
    """The subcommand and its arguments, left by a group's parser (click 8.1 and 8.2+)."""
    protected = getattr(ctx, "_protected_args", None)  # 8.2+: `protected_args` is deprecated
    return [*(ctx.protected_args if protected is None else protected), *ctx.args]


def shell_words(command: str) -> list[str]:
    """A simple shell command (no pipes or quotes beyond plain words) as argv."""
    command = re.sub(r"\s*>\s*/dev/null\s*$", "", command.strip())
    assert not re.search(r"[|;&<>`'\"]", command), f"not a simple command: {command!r}"
    return command.split()
