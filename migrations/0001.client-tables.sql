-- The application's data, as the original design stored it (docs/contract.md §2).

CREATE TABLE client_sessions (
    id              uuid PRIMARY KEY,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    deleted_at      timestamptz,
    name            text NOT NULL,
    creator_id      text NOT NULL,
    mcp_server_url  text NOT NULL,
    websocket_key   text NOT NULL,
    max_players     integer,
    settings        jsonb,
    status          text NOT NULL DEFAULT 'active',
    -- When a backup last wrote this row (not part of the application's data).
    backed_up_at    timestamptz NOT NULL DEFAULT now()
);

-- Restores list the sessions that may come back; soft-deleted ones never do.
CREATE INDEX client_sessions_live_idx ON client_sessions (id) WHERE deleted_at IS NULL;

CREATE TABLE client_messages (
    id          uuid PRIMARY KEY,
    session_id  uuid NOT NULL REFERENCES client_sessions (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL,
    role        text NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content     text,
    tool_calls  jsonb,
    player_id   text
);

CREATE INDEX client_messages_session_created_idx
    ON client_messages (session_id, created_at DESC);
