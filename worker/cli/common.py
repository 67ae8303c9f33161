"""Pieces shared by the commands: options, settings, session ID parsing."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from worker.errors import InvalidArgument
from worker.records import parse_session_id
from worker.settings import Settings
from worker.tls import tls_warning

F = TypeVar("F", bound=Callable[..., Any])


def output_option(func: F) -> F:
    return click.option(
        "--output",
        "-o",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        envvar="DND_OUTPUT",
        show_envvar=True,
        help="Print results as a table (for people) or JSON (for programs).",
    )(func)


def local_option(func: F) -> F:
    return click.option(
        "--local",
        is_flag=True,
        help="Do the work in this process: no broker or worker needed.",
    )(func)


def session_option(verb: str) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        return click.option(
            "--session",
            "session_id",
            metavar="ID",
            callback=_check_session_id,
            help=f"{verb} one session, by its ID (a UUID).",
        )(func)

    return decorate


def _check_session_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return parse_session_id(value)
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc)) from None


@functools.cache
def settings() -> Settings:
    """The settings, read once per command (ConfigError reaches main())."""
    config = Settings.from_env()
    warning = tls_warning(config)
    if warning:
        click.echo(f"dnd-client: warning: {warning}", err=True)
    return config


def one_of_all_or_session(all_sessions: bool, session_id: str | None, extra: str = "") -> None:
    if all_sessions and session_id:
        raise click.UsageError("give either --all or --session ID, not both")
    if not all_sessions and not session_id:
        raise click.UsageError(f"give --all or --session ID{extra}")


def wait_options(func: F) -> F:
    """--no-wait and --timeout: how long a command waits for the workers' run."""
    func = click.option(
        "--timeout",
        type=click.FloatRange(min=1),
        default=None,
        metavar="SECONDS",
        help="Stop waiting after this long (the run goes on); default: wait until done.",
    )(func)
    return click.option(
        "--no-wait",
        is_flag=True,
        help="Hand the run to the workers, print its ID and return at once.",
    )(func)
