-- Back to 0010's history_messages_as_of (its text, verbatim).

-- The messages of sessions as of t: those scored at or below the last
-- capture's max_score (a late one: captured at or before t), not removed at t,
-- with the content they had at t (the earliest edit after t kept it).
-- Shaped for hash joins (an anti-join for the removed, materialized CTEs): the
-- planner cannot estimate the empty history well and would otherwise pick nested
-- loops (measured: 100,000 messages 8.7 s instead of 0.14 s).
CREATE OR REPLACE FUNCTION history_messages_as_of(ids uuid[], t timestamptz)
RETURNS TABLE (
    id uuid, session_id uuid, created_at timestamptz, role text, content text,
    tool_calls jsonb, player_id text
)
LANGUAGE sql STABLE AS $$
    WITH cap AS MATERIALIZED (
        -- floor(epoch ms of created_at) <= max_score, as one timestamp per session.
        SELECT DISTINCT ON (c.session_id) c.session_id,
               to_timestamp((floor(c.max_score) + 1) / 1000) AS until
        FROM history_captures c
        WHERE c.session_id = ANY(ids) AND c.captured_at <= t
        ORDER BY c.session_id, c.captured_at DESC
    ),
    marks AS MATERIALIZED (
        SELECT h.id, h.message_id, h.captured_at, h.change, h.created_at, h.role, h.content,
               h.tool_calls, h.player_id
        FROM history_messages h
        WHERE h.session_id = ANY(ids)
    ),
    late AS (
        SELECT k.message_id, min(k.captured_at) AS at FROM marks k
        WHERE k.change = 'late'
        GROUP BY k.message_id
    ),
    removed AS (
        SELECT p.message_id FROM (
            SELECT DISTINCT ON (k.message_id) k.message_id, k.change FROM marks k
            WHERE k.change IN ('removed', 'returned') AND k.captured_at <= t
            ORDER BY k.message_id, k.captured_at DESC, k.id DESC
        ) AS p
        WHERE p.change = 'removed'
    ),
    earlier AS (
        SELECT DISTINCT ON (k.message_id) k.* FROM marks k
        WHERE k.change = 'edited' AND k.captured_at > t
        ORDER BY k.message_id, k.captured_at, k.id
    )
    SELECT m.id, m.session_id,
           CASE WHEN e.message_id IS NULL THEN m.created_at ELSE e.created_at END,
           CASE WHEN e.message_id IS NULL THEN m.role ELSE e.role END,
           CASE WHEN e.message_id IS NULL THEN m.content ELSE e.content END,
           CASE WHEN e.message_id IS NULL THEN m.tool_calls ELSE e.tool_calls END,
           CASE WHEN e.message_id IS NULL THEN m.player_id ELSE e.player_id END
    FROM client_messages m
    JOIN cap ON cap.session_id = m.session_id
    LEFT JOIN late l ON l.message_id = m.id
    LEFT JOIN earlier e ON e.message_id = m.id
    WHERE m.session_id = ANY(ids)
      AND ((l.message_id IS NULL AND m.created_at < cap.until) OR l.at <= t)
      AND NOT EXISTS (SELECT 1 FROM removed r WHERE r.message_id = m.id)
$$;
