"""worker.keys: the application's Redis key names (docs/contract.md §1)."""

import dataclasses

import pytest

from worker.keys import RedisKeys

SID = "123e4567-e89b-12d3-a456-426614174000"
RUN = "0f8fad5b-d9cb-469f-a165-70867728950e"


@pytest.mark.parametrize(
    ("prefix", "sessions", "session", "messages"),
    [
        ("dnd:", "dnd:sessions", f"dnd:session:{SID}", f"dnd:session:{SID}:messages"),
        ("", "sessions", f"session:{SID}", f"session:{SID}:messages"),
        (
            "test-42:dnd:",
            "test-42:dnd:sessions",
            f"test-42:dnd:session:{SID}",
            f"test-42:dnd:session:{SID}:messages",
        ),
    ],
)
def test_key_names_follow_the_contract(prefix, sessions, session, messages):
    keys = RedisKeys(prefix)
    assert keys.sessions == sessions
    assert keys.session(SID) == session
    assert keys.messages(SID) == messages


def test_restore_staging_key_is_outside_the_application_layout():
    keys = RedisKeys("dnd:")
    staging = keys.restore_staging(RUN, SID)
    assert staging.startswith("dnd:")  # still under our prefix, so cleanup finds it
    assert not staging.startswith("dnd:session:")
    assert staging != keys.messages(SID)
    assert RUN in staging
    assert SID in staging


def test_restore_staging_keys_differ_per_run_and_per_session():
    keys = RedisKeys("dnd:")
    other = "9d5f6c1e-0b7a-4e52-8f3d-2a1b0c9d8e7f"
    assert keys.restore_staging(RUN, SID) != keys.restore_staging(other, SID)
    assert keys.restore_staging(RUN, SID) != keys.restore_staging(RUN, other)


def test_keys_are_immutable_and_comparable():
    keys = RedisKeys("dnd:")
    assert keys == RedisKeys("dnd:")
    with pytest.raises(dataclasses.FrozenInstanceError):
        keys.prefix = "other:"  # type: ignore[misc]
