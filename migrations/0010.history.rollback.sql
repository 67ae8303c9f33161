DROP FUNCTION history_messages_as_of(uuid[], timestamptz);
DROP FUNCTION history_sessions_as_of(uuid[], timestamptz);
ALTER TABLE persistence_snapshots DROP COLUMN as_of;
DROP TABLE history_messages;
DROP TABLE history_session_versions;
DROP TABLE history_captures;
