DELETE FROM persistence_session_results WHERE status = 'different';
ALTER TABLE persistence_session_results DROP CONSTRAINT persistence_session_results_status_check;
ALTER TABLE persistence_session_results ADD CONSTRAINT persistence_session_results_status_check
    CHECK (status IN ('completed', 'unchanged', 'partial', 'skipped', 'failed'));
ALTER TABLE persistence_session_results DROP COLUMN details;
DROP TABLE backup_checksums;
