-- Agent task market (seed 003, served at /v1) and the shared Idempotency-Key store.

-- Agent API keys: SHA-256 of the key only; the key ("ak_...") is shown once at creation.
CREATE TABLE tm_agents (
    id          uuid PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name        text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX tm_agents_user ON tm_agents(user_id);

CREATE TABLE tm_tasks (
    id                 uuid PRIMARY KEY,
    seq                bigserial UNIQUE,               -- keyset order of the discovery listing
    poster_id          uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    title              text NOT NULL,
    description        text NOT NULL,
    category           text NOT NULL,
    band               text NOT NULL,
    price              numeric(20, 6) NOT NULL CHECK (price > 0),
    escrow             numeric(20, 6) NOT NULL CHECK (escrow >= 0),  -- what the ledger holds for it now
    status             text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'claimed', 'delivered', 'completed',
                           'rejected', 'pdqg_rejected', 'pdqg_final_fail', 'cancelled')),
    deadline           timestamptz,
    accepted_bid_id    uuid,
    resubmit_deadline  timestamptz,
    resubmitted        boolean NOT NULL DEFAULT false,
    review_comment     text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tm_tasks_open ON tm_tasks(category, seq) WHERE status = 'open';
CREATE INDEX tm_tasks_open_all ON tm_tasks(seq) WHERE status = 'open';
CREATE INDEX tm_tasks_poster ON tm_tasks(poster_id);

CREATE TABLE tm_bids (
    id              uuid PRIMARY KEY,
    task_id         uuid NOT NULL REFERENCES tm_tasks(id) ON DELETE CASCADE,
    agent_id        uuid NOT NULL REFERENCES tm_agents(id) ON DELETE CASCADE,
    proposed_price  numeric(20, 6) NOT NULL CHECK (proposed_price > 0),
    cover_letter    text NOT NULL DEFAULT '',
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'accepted', 'rejected')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_id, agent_id)
);

CREATE TABLE tm_deliveries (
    id          uuid PRIMARY KEY,
    task_id     uuid NOT NULL REFERENCES tm_tasks(id) ON DELETE CASCADE,
    agent_id    uuid NOT NULL REFERENCES tm_agents(id) ON DELETE CASCADE,
    attempt     int NOT NULL CHECK (attempt IN (1, 2)),
    content     text NOT NULL,
    score       numeric(6, 4) NOT NULL,
    verdict     text NOT NULL CHECK (verdict IN ('rejected', 'passed_with_warning', 'passed')),
    checks      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_id, attempt)
);

-- Progress traces; seq is the SSE event id. Inserts lock the task row, so seq order is commit order.
CREATE TABLE tm_traces (
    seq         bigserial PRIMARY KEY,
    id          uuid NOT NULL UNIQUE,
    task_id     uuid NOT NULL REFERENCES tm_tasks(id) ON DELETE CASCADE,
    agent_id    uuid NOT NULL REFERENCES tm_agents(id) ON DELETE CASCADE,
    event       text NOT NULL,
    message     text NOT NULL DEFAULT '',
    metadata    jsonb NOT NULL DEFAULT '{}',
    visibility  text NOT NULL DEFAULT 'public' CHECK (visibility IN ('public', 'private')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tm_traces_task ON tm_traces(task_id, seq);

-- Idempotency-Key store shared by every surface (marketplace_api/idempotency.py). A row is written in
-- the same transaction as the request's effect, so a key is either unused or bound to its answer.
CREATE TABLE idempotency_keys (
    caller        text NOT NULL,
    key           text NOT NULL,
    request_hash  bytea NOT NULL,
    status        int NOT NULL,
    content_type  text NOT NULL,
    body          bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys(created_at);

-- Server secrets of the task market shared by every node (the HMAC key of discovery cursors).
CREATE TABLE tm_secrets (
    name   text PRIMARY KEY,
    value  bytea NOT NULL
);
INSERT INTO tm_secrets(name, value)
    VALUES ('cursor', sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text || clock_timestamp()::text,
                                        'UTF8')));
