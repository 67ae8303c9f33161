-- Runs over a list of sessions become runs over named sessions of the old kind:
-- "session" is the scope that names its sessions in its results.
UPDATE persistence_snapshots SET scope = 'session' WHERE scope = 'list';
ALTER TABLE persistence_snapshots DROP CONSTRAINT persistence_snapshots_scope_check;
ALTER TABLE persistence_snapshots ADD CONSTRAINT persistence_snapshots_scope_check
    CHECK (scope IN ('all', 'session'));
