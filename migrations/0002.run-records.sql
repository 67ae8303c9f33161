-- One row per backup, restore or verify run, and one per session of each run.
-- depends: 0001.client-tables

CREATE TABLE persistence_snapshots (
    id                 uuid PRIMARY KEY,
    created_at         timestamptz NOT NULL DEFAULT now(),
    session_count      integer NOT NULL DEFAULT 0,
    message_count      bigint NOT NULL DEFAULT 0,
    duration_ms        bigint,
    status             text NOT NULL DEFAULT 'running'
                       CHECK (status IN ('running', 'completed', 'partial', 'failed')),
    kind               text NOT NULL CHECK (kind IN ('backup', 'restore', 'verify')),
    -- 'all', or 'session' for a run over one session (its ID is in the results).
    scope              text NOT NULL CHECK (scope IN ('all', 'session')),
    forced             boolean NOT NULL DEFAULT false,
    -- Records kept aside by this run (bad set members counted at the start,
    -- the per-session counts added when the run finishes).
    kept_count         integer NOT NULL DEFAULT 0,
    failed_count       integer NOT NULL DEFAULT 0,
    -- How many sessions the run will cover, once listed: the denominator of
    -- progress bars, and the check that no per-session result went missing.
    expected_sessions  integer,
    finished_at        timestamptz,
    error              text,
    -- Anything else worth keeping about the run (who started it, targets...).
    details            jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX persistence_snapshots_created_idx ON persistence_snapshots (created_at DESC);
CREATE INDEX persistence_snapshots_running_idx ON persistence_snapshots (created_at)
    WHERE status = 'running';

CREATE TABLE persistence_session_results (
    snapshot_id  uuid NOT NULL REFERENCES persistence_snapshots (id) ON DELETE CASCADE,
    session_id   uuid NOT NULL,
    status       text NOT NULL
                 CHECK (status IN ('completed', 'unchanged', 'partial', 'skipped', 'failed')),
    messages     integer NOT NULL DEFAULT 0,
    kept         integer NOT NULL DEFAULT 0,
    duration_ms  integer NOT NULL DEFAULT 0,
    error        text,
    shard        integer,
    worker       text,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (snapshot_id, session_id)
);

-- "What happened to this session lately?"
CREATE INDEX persistence_session_results_session_idx
    ON persistence_session_results (session_id, finished_at DESC);
