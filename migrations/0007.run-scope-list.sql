-- A run may cover a list of named sessions (worker/runs.py: scope "list"),
-- beside every session ("all") and one session ("session").
-- depends: 0006.checksums-and-verify

ALTER TABLE persistence_snapshots DROP CONSTRAINT persistence_snapshots_scope_check;
ALTER TABLE persistence_snapshots ADD CONSTRAINT persistence_snapshots_scope_check
    CHECK (scope IN ('all', 'session', 'list'));
