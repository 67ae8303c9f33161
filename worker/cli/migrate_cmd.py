"""`dnd-client migrate up|down|status`: the schema, through yoyo."""

from __future__ import annotations

import sys

import click

from worker import exit_codes
from worker import migrate as migrations
from worker.cli.common import output_option, settings
from worker.cli.output import Output


@click.group()
def migrate() -> None:
    """Apply or roll back the database schema (yoyo migrations in migrations/)."""


@migrate.command()
@output_option
def up(output: str) -> int:
    """Apply every pending migration (nothing to do is not an error)."""
    applied = migrations.up(settings())
    out = Output(output)
    out.data({"applied": applied}, columns=("applied",), rows=[(m,) for m in applied])
    if not out.json:
        out.status(
            f"applied {len(applied)} migration(s)"
            if applied
            else "already up to date: nothing to apply"
        )
    return exit_codes.OK


@migrate.command()
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many of the latest applied migrations to roll back.",
)
@click.option("--all", "everything", is_flag=True, help="Roll back every applied migration.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation on a terminal.")
@output_option
def down(steps: int, everything: bool, yes: bool, output: str) -> int:
    """Roll back the latest migration (or --steps N, or --all).

    Rolling back drops the tables that migration created, with their data:
    backed-up sessions included when the first migration is rolled back.
    """
    config = settings()
    applied = [s.id for s in migrations.status(config) if s.applied]
    chosen = list(reversed(applied))[: None if everything else steps]
    out = Output(output)
    if not chosen:
        out.data({"rolled_back": []}, columns=("rolled back",), rows=[])
        if not out.json:
            out.status("nothing to roll back: no migration is applied")
        return exit_codes.OK
    if (
        not yes
        and sys.stdin.isatty()
        and not click.confirm(
            f"Roll back {', '.join(chosen)}? Their tables and data are dropped", err=True
        )
    ):
        out.status("nothing rolled back")
        return exit_codes.FAILURE
    rolled_back = migrations.down(config, steps=None if everything else steps)
    out.data(
        {"rolled_back": rolled_back}, columns=("rolled back",), rows=[(m,) for m in rolled_back]
    )
    if not out.json:
        out.status(f"rolled back {len(rolled_back)} migration(s)")
    return exit_codes.OK


@migrate.command()
@output_option
def status(output: str) -> int:
    """List the migrations, applied and pending."""
    states = migrations.status(settings())
    out = Output(output)
    out.data(
        {
            "applied": [s.as_dict() for s in states if s.applied],
            "pending": [s.id for s in states if not s.applied],
        },
        columns=("migration", "state", "applied at"),
        rows=[
            (
                s.id,
                "applied" if s.applied else "pending",
                s.applied_at.astimezone() if s.applied_at else None,
            )
            for s in states
        ],
    )
    if not out.json:
        pending = sum(not s.applied for s in states)
        out.status(f"{pending} pending: run `dnd-client migrate up`" if pending else "up to date")
    return exit_codes.OK
