-- history_messages_as_of without a nested loop over the removed messages
-- (docs/scaling.md, "History at a year of hourly runs"). 0010's version
-- anti-joined the messages with the removed ones (a CTE): the planner cannot
-- estimate a filtered CTE and expected one removed message, so it chose a
-- Nested Loop Anti Join that compares every message with every removed one
-- (measured, bench/pg_scale.py: a 10,000-message session with 438 removed
-- marks, 4.3 million comparisons; its as-of restore took 338 ms, 65 ms with
-- this version, its as-of verify 334 ms, 98 ms). Here what history says
-- of each marked message (its first late mark, its last presence mark at or
-- before t, its earliest edit after t) is one grouped row per message, joined
-- once with a LEFT JOIN, which the planner hashes; the result is the same.
-- depends: 0010.history

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
    -- One row per marked message: when it was first late, its last presence
    -- mark at or before t ('removed' or 'returned'), and the content the
    -- earliest edit after t kept (edited: whether there is one).
    state AS (
        SELECT k.message_id,
               min(k.captured_at) FILTER (WHERE k.change = 'late') AS late_at,
               (array_agg(k.change ORDER BY k.captured_at DESC, k.id DESC)
                   FILTER (WHERE k.change IN ('removed', 'returned') AND k.captured_at <= t)
               )[1] AS presence,
               bool_or(k.change = 'edited' AND k.captured_at > t) AS edited,
               (array_agg(k.created_at ORDER BY k.captured_at, k.id)
                   FILTER (WHERE k.change = 'edited' AND k.captured_at > t))[1] AS created_at,
               (array_agg(k.role ORDER BY k.captured_at, k.id)
                   FILTER (WHERE k.change = 'edited' AND k.captured_at > t))[1] AS role,
               (array_agg(k.content ORDER BY k.captured_at, k.id)
                   FILTER (WHERE k.change = 'edited' AND k.captured_at > t))[1] AS content,
               (array_agg(k.tool_calls ORDER BY k.captured_at, k.id)
                   FILTER (WHERE k.change = 'edited' AND k.captured_at > t))[1] AS tool_calls,
               (array_agg(k.player_id ORDER BY k.captured_at, k.id)
                   FILTER (WHERE k.change = 'edited' AND k.captured_at > t))[1] AS player_id
        FROM marks k
        GROUP BY k.message_id
    )
    SELECT m.id, m.session_id,
           CASE WHEN s.edited THEN s.created_at ELSE m.created_at END,
           CASE WHEN s.edited THEN s.role ELSE m.role END,
           CASE WHEN s.edited THEN s.content ELSE m.content END,
           CASE WHEN s.edited THEN s.tool_calls ELSE m.tool_calls END,
           CASE WHEN s.edited THEN s.player_id ELSE m.player_id END
    FROM client_messages m
    JOIN cap ON cap.session_id = m.session_id
    LEFT JOIN state s ON s.message_id = m.id
    WHERE m.session_id = ANY(ids)
      AND ((s.late_at IS NULL AND m.created_at < cap.until) OR s.late_at <= t)
      AND s.presence IS DISTINCT FROM 'removed'
$$;
