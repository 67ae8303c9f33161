-- Every query the PostgreSQL store runs, as named blocks: a line "-- name: x"
-- starts the query named x (loaded by worker/sql/__init__.py). Parameters are
-- psycopg's %(name)s placeholders; nothing is ever spliced in as text.

-- name: migration_applied
-- Is this migration applied? (yoyo's bookkeeping table: no table, no schema.)
SELECT EXISTS (SELECT 1 FROM _yoyo_migration WHERE migration_id = %(id)s) AS applied;

-- name: lock_sessions
-- Serialises every backup and restore of the same session, across processes
-- and hosts: they all share this database. Transaction-scoped, so a crashed
-- worker's locks go with its connection. Taken in key order: two batches that
-- share sessions can never deadlock.
SELECT pg_advisory_xact_lock(1684956267, key)
FROM (SELECT DISTINCT hashtext(id) AS key FROM unnest(%(ids)s::text[]) AS id) AS keys
ORDER BY key;

-- name: prefer_indexes
-- Every lookup of a backup is by key. Without this, the foreign-key check of
-- each COPYed message (a query PostgreSQL plans once per connection and then
-- keeps) can be planned as a sequential scan of client_sessions while that
-- table is still small (a first backup), and stay one as it grows: every
-- message then scans every session (measured: 1M messages, 3x slower).
-- And no JIT: a plan with a disabled node costs 1e10, far above jit_above_cost,
-- so every merge query was JIT-compiled with inlining and optimisation, 0.5 to
-- 2 s each whatever its size: a 10,000-message session took 10 s to merge
-- (bench/pg_scale.py, docs/scaling.md). Every query of a backup reads by key.
SET LOCAL enable_seqscan = off;
SET LOCAL jit = off;

-- name: watermarks
-- Rows by name: every query read into a dataclass (see pg_store.Rows) names its
-- columns after the fields, with an alias wherever a column is cast.
SELECT session_id::text AS session_id, hash_digest, message_count, max_score
FROM backup_watermarks
WHERE session_id = ANY(%(ids)s::uuid[]);

-- name: upsert_session
INSERT INTO client_sessions (
    id, created_at, updated_at, deleted_at, name, creator_id, mcp_server_url,
    websocket_key, max_players, settings, status, backed_up_at
) VALUES (
    %(id)s, %(created_at)s, %(updated_at)s, %(deleted_at)s, %(name)s, %(creator_id)s,
    %(mcp_server_url)s, %(websocket_key)s, %(max_players)s, %(settings)s::jsonb, %(status)s, now()
)
ON CONFLICT (id) DO UPDATE SET
    created_at = EXCLUDED.created_at,
    updated_at = EXCLUDED.updated_at,
    deleted_at = EXCLUDED.deleted_at,
    name = EXCLUDED.name,
    creator_id = EXCLUDED.creator_id,
    mcp_server_url = EXCLUDED.mcp_server_url,
    websocket_key = EXCLUDED.websocket_key,
    max_players = EXCLUDED.max_players,
    settings = EXCLUDED.settings,
    status = EXCLUDED.status,
    backed_up_at = now();

-- name: copy_messages
-- Text, not binary: binary saves PostgreSQL parsing UUIDs and timestamps, but
-- making UUID objects costs us more than it saves (measured on 1M messages:
-- 9.4 s text, 10.5 s binary), and a backup keeps both sides busy.
COPY client_messages (id, session_id, created_at, role, content, tool_calls, player_id)
FROM STDIN;

-- name: create_merge_tables
-- Per-connection scratch tables for the merge path (see PostgresStore.merge_chunk).
CREATE TEMPORARY TABLE IF NOT EXISTS merge_staging (
    id uuid NOT NULL,
    session_id uuid NOT NULL,
    created_at timestamptz NOT NULL,
    role text NOT NULL,
    content text,
    tool_calls jsonb,
    player_id text
) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS merge_seen (id uuid PRIMARY KEY) ON COMMIT DELETE ROWS;

-- name: reset_merge_seen
TRUNCATE merge_seen;

-- name: copy_merge_staging
COPY merge_staging (id, session_id, created_at, role, content, tool_calls, player_id)
FROM STDIN;

-- name: merge_rejects
-- Rows of the chunk that must not be merged: an ID already read earlier in this
-- session's scan ('duplicate'), or an ID that belongs to another session (its ID).
WITH fresh AS (
    INSERT INTO merge_seen (id)
    SELECT id FROM merge_staging
    ON CONFLICT DO NOTHING
    RETURNING id
)
-- The owner of each ID is looked up one ID at a time (LATERAL ... LIMIT 1, which
-- the planner cannot turn back into a join): as a plain join, the planner knows
-- nothing of the temporary table and chose a merge join over the whole primary
-- key of client_messages, 22 s a chunk at 1 million rows, minutes at 20 million
-- (bench/pg_scale.py, docs/scaling.md).
SELECT s.id::text AS message_id,
       CASE WHEN f.id IS NULL THEN 'duplicate' ELSE m.session_id::text END AS reason
FROM merge_staging s
LEFT JOIN fresh f ON f.id = s.id
LEFT JOIN LATERAL (
    SELECT c.session_id FROM client_messages c
    WHERE c.id = s.id AND c.session_id <> s.session_id
    LIMIT 1
) m ON true
WHERE f.id IS NULL OR m.session_id IS NOT NULL;

-- name: drop_merge_rejects
DELETE FROM merge_staging WHERE id = ANY(%(ids)s::uuid[]);

-- name: merge_messages
-- New messages are inserted; a message whose content changed in Redis (an
-- edit) is updated; an identical one is left alone, so rowcount counts exactly
-- the messages this run stored.
INSERT INTO client_messages (id, session_id, created_at, role, content, tool_calls, player_id)
SELECT id, session_id, created_at, role, content, tool_calls, player_id FROM merge_staging
ON CONFLICT (id) DO UPDATE SET
    created_at = EXCLUDED.created_at,
    role = EXCLUDED.role,
    content = EXCLUDED.content,
    tool_calls = EXCLUDED.tool_calls,
    player_id = EXCLUDED.player_id
WHERE client_messages.session_id = EXCLUDED.session_id
  AND (client_messages.created_at, client_messages.role, client_messages.content,
       client_messages.tool_calls, client_messages.player_id)
      IS DISTINCT FROM
      (EXCLUDED.created_at, EXCLUDED.role, EXCLUDED.content,
       EXCLUDED.tool_calls, EXCLUDED.player_id);

-- name: merge_late_rejects
-- Rows merge_messages skipped: their ID was committed for another session by a
-- concurrent backup after merge_rejects looked (the INSERT waited for it, then
-- its ON CONFLICT ... WHERE left the other session's row alone).
-- One ID at a time, as in merge_rejects.
SELECT s.id::text AS message_id, m.session_id::text AS reason
FROM merge_staging s
CROSS JOIN LATERAL (
    SELECT c.session_id FROM client_messages c
    WHERE c.id = s.id AND c.session_id <> s.session_id
    LIMIT 1
) m;

-- name: clear_merge_staging
TRUNCATE merge_staging;

-- name: save_watermark
INSERT INTO backup_watermarks (session_id, hash_digest, message_count, max_score, snapshot_id)
VALUES (%(session_id)s, %(hash_digest)s, %(message_count)s, %(max_score)s, %(snapshot_id)s)
ON CONFLICT (session_id) DO UPDATE SET
    hash_digest = EXCLUDED.hash_digest,
    message_count = EXCLUDED.message_count,
    max_score = EXCLUDED.max_score,
    snapshot_id = EXCLUDED.snapshot_id,
    updated_at = now();

-- name: keep_record
INSERT INTO persistence_kept_records (
    kind, redis_key, session_id, message_id, score, reason, raw, raw_sha256, preview,
    first_snapshot_id, last_snapshot_id
) VALUES (
    %(kind)s, %(redis_key)s, %(session_id)s, %(message_id)s, %(score)s, %(reason)s, %(raw)s,
    sha256(%(raw)s), %(preview)s, %(snapshot_id)s, %(snapshot_id)s
)
ON CONFLICT (redis_key, raw_sha256) DO UPDATE SET
    reason = EXCLUDED.reason,
    -- Seen again: still in Redis, still not stored. Whoever marked it resolved
    -- should know it is back.
    resolved_at = NULL,
    last_snapshot_id = EXCLUDED.last_snapshot_id,
    last_seen_at = now(),
    times_seen = persistence_kept_records.times_seen + 1;

-- name: list_kept_records
SELECT id, kind, redis_key, session_id, message_id, score, reason, preview,
       first_snapshot_id::text AS first_snapshot_id, last_snapshot_id::text AS last_snapshot_id,
       first_seen_at, last_seen_at, times_seen, resolved_at
FROM persistence_kept_records
WHERE (%(include_resolved)s OR resolved_at IS NULL)
  AND (%(snapshot_id)s::uuid IS NULL OR last_snapshot_id = %(snapshot_id)s::uuid)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: resolve_kept_records
UPDATE persistence_kept_records SET resolved_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND resolved_at IS NULL;

-- name: sessions
SELECT id::text AS id, name, creator_id, mcp_server_url, websocket_key, created_at, updated_at,
       max_players, settings::text AS settings, status, deleted_at
FROM client_sessions
WHERE id = ANY(%(ids)s::uuid[]);

-- name: live_session_ids_page
-- Keyset pagination over the sessions a restore may bring back.
SELECT id::text AS id FROM client_sessions
WHERE deleted_at IS NULL AND (%(after)s::uuid IS NULL OR id > %(after)s::uuid)
ORDER BY id
LIMIT %(limit)s;

-- name: count_soft_deleted
SELECT count(*) AS sessions FROM client_sessions WHERE deleted_at IS NOT NULL;

-- name: restore_members
-- Messages as the zset members a restore writes: compact JSON in the
-- contract's key order, built by PostgreSQL (which has a core of its own) so
-- the restoring process only moves bytes. Timestamps are RFC 3339 in UTC; the
-- score is created_at in epoch milliseconds, rounded down like Go's UnixMilli.
COPY (
    SELECT session_id::text,
           convert_to(
               '{"id":"' || id::text
               || '","session_id":"' || session_id::text
               || '","created_at":"'
               || to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
               || '","role":' || to_json(role)::text
               || ',"content":' || coalesce(to_json(content)::text, 'null')
               || ',"tool_calls":' || coalesce(tool_calls::text, 'null')
               || ',"player_id":' || coalesce(to_json(player_id)::text, 'null')
               || '}',
               'UTF8'),
           floor(extract(epoch FROM created_at) * 1000)::bigint
    FROM client_messages
    WHERE session_id = ANY(%(ids)s::uuid[])
) TO STDOUT (FORMAT BINARY);

-- name: message_counts
SELECT session_id::text AS session_id, count(*) AS messages FROM client_messages
WHERE session_id = ANY(%(ids)s::uuid[])
GROUP BY session_id;

-- name: start_run
INSERT INTO persistence_snapshots (id, kind, scope, forced, expected_sessions, kept_count, details)
VALUES (%(id)s, %(kind)s, %(scope)s, %(forced)s, %(expected_sessions)s, %(kept_count)s,
        %(details)s::jsonb)
-- A retried task starts "its" run again: the run is already there, keep it.
ON CONFLICT (id) DO NOTHING
RETURNING id::text AS id, kind, scope, status, created_at, finished_at, session_count,
          message_count, kept_count, failed_count, duration_ms, error, forced,
          expected_sessions, details;

-- name: record_results
INSERT INTO persistence_session_results (
    snapshot_id, session_id, status, messages, kept, duration_ms, error, shard, worker,
    finished_at, details
)
SELECT %(snapshot_id)s, r.session_id, r.status, r.messages, r.kept, r.duration_ms, r.error,
       r.shard, r.worker, coalesce(r.finished_at, now()), r.details
FROM unnest(%(session_ids)s::uuid[], %(statuses)s::text[], %(messages)s::int[], %(kept)s::int[],
            %(durations)s::int[], %(errors)s::text[], %(shards)s::int[], %(workers)s::text[],
            %(finished)s::timestamptz[], %(details)s::jsonb[])
     AS r (session_id, status, messages, kept, duration_ms, error, shard, worker, finished_at,
           details)
-- A retried task reports again: its latest word replaces the earlier one.
ON CONFLICT (snapshot_id, session_id) DO UPDATE SET
    status = EXCLUDED.status,
    messages = EXCLUDED.messages,
    kept = EXCLUDED.kept,
    duration_ms = EXCLUDED.duration_ms,
    error = EXCLUDED.error,
    shard = EXCLUDED.shard,
    worker = EXCLUDED.worker,
    finished_at = EXCLUDED.finished_at,
    details = EXCLUDED.details;

-- name: finish_run
-- Totals come from the per-session results, so the numbers in the snapshot row
-- always agree with its results, whoever finishes the run. Only a running run
-- is finished: finishing twice changes nothing.
WITH totals AS (
    SELECT count(*) AS sessions,
           coalesce(sum(messages), 0) AS messages,
           coalesce(sum(kept), 0) AS kept,
           -- A verify's 'different' sessions fail it as errors fail a backup.
           count(*) FILTER (WHERE status IN ('failed', 'different')) AS failed,
           count(*) FILTER (WHERE status = 'skipped') AS skipped,
           count(*) FILTER (WHERE status = 'unchanged') AS unchanged,
           (array_agg(session_id::text || ': ' || coalesce(error, 'no reason given')
                      ORDER BY finished_at) FILTER (WHERE status IN ('failed', 'different')))[1]
               AS first_failure
    FROM persistence_session_results
    WHERE snapshot_id = %(id)s
)
UPDATE persistence_snapshots AS s SET
    session_count = t.sessions,
    message_count = t.messages,
    kept_count = s.kept_count + t.kept,
    failed_count = t.failed,
    -- What the summary shows beside the totals: why sessions moved nothing.
    details = s.details || jsonb_build_object('skipped', t.skipped, 'unchanged', t.unchanged),
    finished_at = now(),
    duration_ms = (extract(epoch FROM now() - s.created_at) * 1000)::bigint,
    error = coalesce(%(error)s::text,
                     CASE WHEN s.expected_sessions > t.sessions
                          THEN (s.expected_sessions - t.sessions)::text
                               || ' of ' || s.expected_sessions::text
                               || ' sessions have no result' END,
                     CASE WHEN t.failed > 0
                          THEN t.failed::text
                               || CASE WHEN s.kind = 'verify' THEN ' session(s) differ'
                                       ELSE ' session(s) failed' END
                               || '; first: ' || t.first_failure END),
    status = CASE
        WHEN %(error)s::text IS NOT NULL OR t.failed > 0 OR s.expected_sessions > t.sessions
            THEN 'failed'
        WHEN s.kept_count + t.kept > 0 THEN 'partial'
        ELSE 'completed'
    END
FROM totals AS t
WHERE s.id = %(id)s AND s.status = 'running'
RETURNING s.id::text AS id, s.kind, s.scope, s.status, s.created_at, s.finished_at,
          s.session_count, s.message_count, s.kept_count, s.failed_count, s.duration_ms,
          s.error, s.forced, s.expected_sessions, s.details;

-- name: get_run
SELECT id::text AS id, kind, scope, status, created_at, finished_at, session_count, message_count,
       kept_count, failed_count, duration_ms, error, forced, expected_sessions, details
FROM persistence_snapshots
WHERE id = %(id)s;

-- name: list_runs
SELECT id::text AS id, kind, scope, status, created_at, finished_at, session_count, message_count,
       kept_count, failed_count, duration_ms, error, forced, expected_sessions, details
FROM persistence_snapshots
WHERE (%(kind)s::text IS NULL OR kind = %(kind)s::text)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: run_progress
-- What a waiting CLI shows: how many sessions of the run have reported so far.
SELECT count(*) AS sessions, coalesce(sum(messages), 0) AS messages,
       coalesce(sum(kept), 0) AS kept, count(*) FILTER (WHERE status = 'failed') AS failed
FROM persistence_session_results
WHERE snapshot_id = %(id)s;

-- name: run_results
SELECT session_id::text AS session_id, status, messages, kept, duration_ms, error, shard, worker,
       finished_at, details
FROM persistence_session_results
WHERE snapshot_id = %(id)s
ORDER BY finished_at, session_id;

-- name: get_kept_record
SELECT id, kind, redis_key, session_id, message_id, score, reason, raw, preview,
       first_snapshot_id::text AS first_snapshot_id, last_snapshot_id::text AS last_snapshot_id,
       first_seen_at, last_seen_at, times_seen, resolved_at
FROM persistence_kept_records
WHERE id = %(id)s;

-- name: running_full_run
SELECT id::text AS id FROM persistence_snapshots
WHERE kind = %(kind)s AND scope = 'all' AND status = 'running';

-- name: stale_runs
-- Runs still `running` with no sign of life (no per-session result, and not
-- started) for longer than the given number of seconds.
SELECT s.id::text AS id
FROM persistence_snapshots s
WHERE s.status = 'running'
  AND greatest(s.created_at,
               (SELECT max(r.finished_at) FROM persistence_session_results r
                WHERE r.snapshot_id = s.id))
      < now() - make_interval(secs => %(seconds)s);

-- name: mark_run_dispatched
UPDATE persistence_snapshots
SET details = details || jsonb_build_object('dispatched', true)
WHERE id = %(id)s;

-- name: checksums
SELECT session_id::text AS session_id, message_count, messages_digest, session_digest
FROM backup_checksums
WHERE session_id = ANY(%(ids)s::uuid[]);

-- name: save_checksum
INSERT INTO backup_checksums (session_id, message_count, messages_digest, session_digest,
                              snapshot_id)
VALUES (%(session_id)s, %(message_count)s, %(messages_digest)s, %(session_digest)s,
        %(snapshot_id)s)
ON CONFLICT (session_id) DO UPDATE SET
    message_count = EXCLUDED.message_count,
    messages_digest = EXCLUDED.messages_digest,
    session_digest = EXCLUDED.session_digest,
    snapshot_id = EXCLUDED.snapshot_id,
    computed_at = now();

-- name: message_rows
-- Messages as stored, for checksums and verify (digests are computed in
-- Python, the same way for rows read from Redis).
COPY (
    SELECT id::text, session_id::text, created_at, role, content, tool_calls::text, player_id
    FROM client_messages
    WHERE session_id = ANY(%(ids)s::uuid[])
) TO STDOUT (FORMAT BINARY);

-- name: prune_runs
-- Old run records go, with their per-session results (ON DELETE CASCADE).
-- Never a running run; never the backed-up sessions and messages. `keep`
-- counts finished runs per kind (newest first); with both criteria, a run
-- goes only when it meets both.
WITH ranked AS (
    SELECT id, coalesce(finished_at, created_at) AS ended,
           row_number() OVER (PARTITION BY kind ORDER BY created_at DESC, id DESC) AS newest
    FROM persistence_snapshots
    WHERE status <> 'running'
),
doomed AS (
    SELECT id FROM ranked
    WHERE (%(keep)s::int IS NULL OR newest > %(keep)s::int)
      AND (%(before)s::timestamptz IS NULL OR ended < %(before)s::timestamptz)
),
results AS (
    SELECT count(*) AS n FROM persistence_session_results r JOIN doomed d ON d.id = r.snapshot_id
),
deleted AS (
    DELETE FROM persistence_snapshots s USING doomed d WHERE s.id = d.id RETURNING s.id
)
SELECT (SELECT count(*) FROM deleted) AS runs, (SELECT n FROM results) AS session_results;

-- name: prune_resolved_kept
-- Kept-aside records go only once marked resolved, and once the run that last
-- saw them is gone (or they were last seen before the cut-off).
DELETE FROM persistence_kept_records
WHERE resolved_at IS NOT NULL
  AND (last_snapshot_id IS NULL
       OR (%(before)s::timestamptz IS NOT NULL AND last_seen_at < %(before)s::timestamptz));

-- name: try_owner_lock
-- Who drives a run (a --local process, a coordinator task) or works on one of
-- its batches holds this lock on its connection: a session-level advisory lock,
-- gone the moment its connection is (the process died, or PostgreSQL dropped
-- it). Never waits: a key held by someone else means a live owner.
SELECT pg_try_advisory_lock(%(class)s, hashtext(%(key)s)) AS locked;

-- name: release_owner_lock
SELECT pg_advisory_unlock(%(class)s, hashtext(%(key)s)) AS released;

-- name: live_owners
-- The keys whose owner lock someone holds now (in this database).
SELECT key FROM unnest(%(keys)s::text[]) AS key
WHERE EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = %(class)s::oid
      AND l.objid = (hashtext(key)::bigint & 4294967295)::oid
);

-- name: copy_batches
COPY persistence_run_batches (snapshot_id, batch_no, shard, session_ids) FROM STDIN;

-- name: batch
SELECT snapshot_id::text AS run_id, batch_no, shard, session_ids::text[] AS session_ids,
       dispatched_at, dispatches, started_at, starts, retry_at, last_error
FROM persistence_run_batches
WHERE snapshot_id = %(id)s AND batch_no = %(batch_no)s;

-- name: begin_batch
-- A worker begins the batch: the sessions it still has to do (no result yet).
WITH begun AS (
    UPDATE persistence_run_batches
    SET started_at = now(), starts = starts + 1, retry_at = NULL
    WHERE snapshot_id = %(id)s AND batch_no = %(batch_no)s
    RETURNING session_ids
)
SELECT sid::text AS session_id
FROM begun, unnest(begun.session_ids) AS sid
WHERE NOT EXISTS (
    SELECT 1 FROM persistence_session_results r
    WHERE r.snapshot_id = %(id)s AND r.session_id = sid
)
ORDER BY sid;

-- name: batch_retry_at
UPDATE persistence_run_batches SET retry_at = %(retry_at)s, last_error = %(error)s
WHERE snapshot_id = %(id)s AND batch_no = %(batch_no)s;

-- name: unfinished_batches
-- Batches with a session that has no result in the run yet.
SELECT b.snapshot_id::text AS run_id, b.batch_no, b.shard, b.session_ids::text[] AS session_ids,
       b.dispatched_at, b.dispatches, b.started_at, b.starts, b.retry_at, b.last_error
FROM persistence_run_batches b
WHERE b.snapshot_id = %(id)s
  AND EXISTS (
      SELECT 1 FROM unnest(b.session_ids) AS sid
      WHERE NOT EXISTS (
          SELECT 1 FROM persistence_session_results r
          WHERE r.snapshot_id = b.snapshot_id AND r.session_id = sid
      )
  )
ORDER BY b.batch_no;

-- name: batch_redispatched
UPDATE persistence_run_batches SET dispatched_at = now(), dispatches = dispatches + 1
WHERE snapshot_id = %(id)s AND batch_no = %(batch_no)s;

-- name: running_runs
SELECT id::text AS id, kind, scope, status, created_at, finished_at, session_count, message_count,
       kept_count, failed_count, duration_ms, error, forced, expected_sessions, details
FROM persistence_snapshots
WHERE status = 'running'
ORDER BY created_at;

-- name: reported_sessions
SELECT count(*) AS reported FROM persistence_session_results WHERE snapshot_id = %(id)s;

-- name: sessions_without_result
SELECT sid::text AS session_id
FROM unnest(%(ids)s::uuid[]) AS sid
WHERE NOT EXISTS (
    SELECT 1 FROM persistence_session_results r
    WHERE r.snapshot_id = %(id)s AND r.session_id = sid
)
ORDER BY sid;
