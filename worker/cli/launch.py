"""Starting a run from the command line: in this process (--local) or on the workers.

`backup`, `restore` and `verify` all start their runs here, with the run's
options (worker.models.RunOptions), so the three commands differ only in the
options they build and in how they report the run that comes back.
"""

from __future__ import annotations

import click

from worker.cli.common import settings
from worker.cli.output import Output, ProgressBar
from worker.models import Run, RunOptions
from worker.runs import KINDS
from worker.services import open_services


def launch(
    options: RunOptions,
    *,
    session_id: str | None,
    local: bool,
    no_wait: bool,
    timeout: float | None,
    out: Output,
) -> Run | None:
    """Run ``options``' kind of run over one session or all; the finished run.

    None with --no-wait: the run was handed to the workers and its ID printed.
    """
    if local:
        if no_wait:
            raise click.UsageError("--no-wait needs the workers; it cannot go with --local")
        return run_here(options, session_id=session_id)
    from worker.cli.dispatch import run_on_workers

    return run_on_workers(options, session_id=session_id, no_wait=no_wait, timeout=timeout, out=out)


def run_here(options: RunOptions, *, session_id: str | None) -> Run:
    """The run in this process, with a progress bar on a terminal."""
    from worker.runner import run_local

    bar = ProgressBar(KINDS[options.kind].doing)
    with open_services(settings()) as services:
        try:
            ids = None if session_id is None else [session_id]
            return run_local(services, options, session_ids=ids, progress=bar)
        finally:
            bar.close()
