"""Options sent to the published tasks are arguments those tasks take.

The CLI and the supervisor send a run's options to `restore_session`,
`full_restore`, ... by name (RunOptions.task_arguments); an option that only
the process making the engine knows (a drill's keep_replaced=False) must never
be sent: the task would fail with "unexpected keyword argument" and the run
would wait for a batch that never runs.
"""

from __future__ import annotations

import inspect

import pytest

from worker import tasks
from worker.models import BackupOptions, RestoreOptions, VerifyOptions

FULL = {"backup": tasks.full_backup, "restore": tasks.full_restore, "verify": tasks.full_verify}
SESSION = {
    "backup": tasks.backup_session,
    "restore": tasks.restore_session,
    "verify": tasks.verify_session,
}


@pytest.mark.parametrize("options", [BackupOptions(), RestoreOptions(), VerifyOptions()])
def test_every_option_sent_is_an_argument_of_the_kinds_tasks(options):
    for task in (FULL[options.kind], SESSION[options.kind]):
        accepted = set(inspect.signature(task.run).parameters)
        assert set(options.task_arguments()) <= accepted, (task.name, options)


def test_a_drills_keep_replaced_is_not_sent():
    assert "keep_replaced" not in RestoreOptions(keep_replaced=False).task_arguments()
    assert RestoreOptions(force=True, as_of="2026-01-01T00:00:00+00:00").task_arguments() == {
        "force": True,
        "as_of": "2026-01-01T00:00:00+00:00",
    }
