-- The batches a run on the workers was cut into, so that a batch whose task was
-- lost (a worker killed, a broker restarted without its queues, a task
-- acknowledged without running) can be sent again, and a late copy of one
-- can tell that its work is done (worker/runs.py, worker/supervise.py).
-- depends: 0007.run-scope-list

CREATE TABLE persistence_run_batches (
    snapshot_id    uuid NOT NULL REFERENCES persistence_snapshots (id) ON DELETE CASCADE,
    batch_no       integer NOT NULL,
    shard          integer NOT NULL,
    session_ids    uuid[] NOT NULL,
    -- When its task was last sent, and how many times.
    dispatched_at  timestamptz NOT NULL DEFAULT now(),
    dispatches     integer NOT NULL DEFAULT 1,
    -- When a worker last began it, and how many times one did.
    started_at     timestamptz,
    starts         integer NOT NULL DEFAULT 0,
    -- A retry is scheduled for then (the task met a server down, a lock held).
    retry_at       timestamptz,
    last_error     text,
    PRIMARY KEY (snapshot_id, batch_no)
);

