-- Checksums of what PostgreSQL holds per session (recorded by every backup),
-- and what verify runs need: a per-session 'different' status and details.
-- depends: 0005.one-running-full-run

CREATE TABLE backup_checksums (
    session_id       uuid PRIMARY KEY REFERENCES client_sessions (id) ON DELETE CASCADE,
    -- Messages of the session in client_messages, and the sum (mod 2^128) of
    -- their digests (worker/checksums.py), as the last backup left them.
    message_count    bigint NOT NULL,
    messages_digest  bytea NOT NULL,
    -- Digest of the session row.
    session_digest   bytea NOT NULL,
    snapshot_id      uuid,
    computed_at      timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE persistence_session_results ADD COLUMN details jsonb;

ALTER TABLE persistence_session_results DROP CONSTRAINT persistence_session_results_status_check;
ALTER TABLE persistence_session_results ADD CONSTRAINT persistence_session_results_status_check
    CHECK (status IN ('completed', 'unchanged', 'partial', 'skipped', 'failed', 'different'));
