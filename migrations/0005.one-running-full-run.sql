-- At most one full (scope 'all') run of each kind is running at a time. This
-- is what keeps two beat processes, a beat tick and an operator, or two
-- operators from starting overlapping full backups: the second INSERT fails,
-- whoever made it, whatever the topology.
-- depends: 0004.backup-watermarks

CREATE UNIQUE INDEX persistence_snapshots_one_running_full_run
    ON persistence_snapshots (kind)
    WHERE status = 'running' AND scope = 'all';
