-- Core schema: users, tokens, devices, the data plane's credential store, RMS connections, blacklists.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    name          text NOT NULL,
    email         text,
    country       text,
    rating        numeric(4, 2) NOT NULL DEFAULT 5,
    is_premium    boolean NOT NULL DEFAULT false,
    referrer_id   uuid REFERENCES users(id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- API tokens are stored as SHA-256 digests only.
CREATE TABLE api_tokens (
    token_hash    bytea PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind          text NOT NULL DEFAULT 'user',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_tokens_user ON api_tokens(user_id);

CREATE TABLE devices (
    remote_device_id       uuid PRIMARY KEY,
    user_id                uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name                   text NOT NULL UNIQUE,
    token_hash             bytea NOT NULL,
    added                  timestamptz NOT NULL DEFAULT now(),
    brand                  text,
    model                  text,
    version                text,
    sdk_version            text,
    processor              text,
    country                text,
    network_type           text,
    number_of_cores        integer,
    ram_mb                 integer,
    is_emulator            boolean NOT NULL DEFAULT false,
    online                 boolean NOT NULL DEFAULT false,
    node                   text,
    last_seen              timestamptz,
    payment_type           text,
    is_on_market           boolean NOT NULL DEFAULT false,
    is_rented              boolean NOT NULL DEFAULT false,
    rented_by              uuid REFERENCES users(id) ON DELETE SET NULL,
    phone_number           text,
    phone_number_verified  boolean NOT NULL DEFAULT false
);
CREATE INDEX devices_user ON devices(user_id);

-- The data plane's credential store: only a keyed hash of the password and the association.
CREATE TABLE proxy_credentials (
    connection_id   uuid PRIMARY KEY,
    password_hash   bytea NOT NULL,
    device_id       uuid REFERENCES devices(remote_device_id) ON DELETE SET NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX proxy_credentials_device ON proxy_credentials(device_id);

-- RMS: the owner side of a connection; the plaintext password is kept AES-GCM encrypted.
CREATE TABLE rms_connections (
    connection_id       uuid PRIMARY KEY REFERENCES proxy_credentials(connection_id) ON DELETE CASCADE,
    owner_user_id       uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name                text,
    password_encrypted  bytea NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rms_connections_owner ON rms_connections(owner_user_id);

-- Blacklists: scope 'global' (scope_id NULL), 'device' or 'connection'.
CREATE TABLE blacklist_entries (
    scope       text NOT NULL CHECK (scope IN ('global', 'device', 'connection')),
    scope_id    uuid,
    entry       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX blacklist_unique ON blacklist_entries(scope, coalesce(scope_id, '00000000-0000-0000-0000-000000000000'::uuid), entry);

-- Invalidations for the auth caches of every node, sent in the writing transaction.
-- Payload: 'conn:<id>' (credential changed), 'kill:<id>' (terminate sessions), 'device:<id>', 'global'.
CREATE FUNCTION notify_proxy_credentials() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('proxy_invalidate', 'kill:' || OLD.connection_id::text);
    ELSIF TG_OP = 'UPDATE' AND OLD.device_id IS NOT NULL AND NEW.device_id IS NULL THEN
        PERFORM pg_notify('proxy_invalidate', 'kill:' || NEW.connection_id::text);
    ELSE
        PERFORM pg_notify('proxy_invalidate', 'conn:' || NEW.connection_id::text);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE TRIGGER proxy_credentials_notify AFTER INSERT OR UPDATE OR DELETE ON proxy_credentials
    FOR EACH ROW EXECUTE FUNCTION notify_proxy_credentials();

CREATE FUNCTION notify_blacklist() RETURNS trigger AS $$
DECLARE r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    IF r.scope = 'global' THEN
        PERFORM pg_notify('proxy_invalidate', 'global');
    ELSIF r.scope = 'device' THEN
        PERFORM pg_notify('proxy_invalidate', 'device:' || r.scope_id::text);
    ELSE
        PERFORM pg_notify('proxy_invalidate', 'conn:' || r.scope_id::text);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE TRIGGER blacklist_notify AFTER INSERT OR UPDATE OR DELETE ON blacklist_entries
    FOR EACH ROW EXECUTE FUNCTION notify_blacklist();
