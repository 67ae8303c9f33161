DROP TABLE persistence_session_results;
DROP TABLE persistence_snapshots;
