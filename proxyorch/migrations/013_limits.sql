-- Per-connection limits (speed, concurrent sessions, traffic quota), access modes, and usage counters.

CREATE TABLE connection_limits (
    connection_id            uuid PRIMARY KEY REFERENCES proxy_credentials(connection_id) ON DELETE CASCADE,
    download_bytes_per_s     bigint CHECK (download_bytes_per_s >= 1),
    upload_bytes_per_s       bigint CHECK (upload_bytes_per_s >= 1),
    max_concurrent_sessions  integer CHECK (max_concurrent_sessions >= 1),
    quota_bytes              bigint CHECK (quota_bytes >= 1),
    quota_period             text CHECK (quota_period IN ('day', 'month', 'total')),
    quota_set_at             timestamptz,
    access_mode              text NOT NULL DEFAULT 'password'
                             CHECK (access_mode IN ('password', 'password_and_ip', 'ip_only')),
    allowed_ips              text[] NOT NULL DEFAULT '{}',
    updated_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX connection_limits_ip_only ON connection_limits(access_mode) WHERE access_mode = 'ip_only';

-- Relayed payload bytes (both directions) per connection and period, added to by the node that relayed
-- them. period 'day' / 'month' start at the UTC day / month; 'total' at 1970-01-01 (lifetime) or at the
-- time a 'total' quota was set. No foreign key: a node may flush the last bytes after a delete.
CREATE TABLE connection_usage (
    connection_id  uuid NOT NULL,
    period         text NOT NULL CHECK (period IN ('day', 'month', 'total')),
    period_start   timestamptz NOT NULL,
    used_bytes     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (connection_id, period, period_start)
);

CREATE FUNCTION notify_connection_limits() RETURNS trigger AS $$
DECLARE r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('proxy_invalidate', 'conn:' || r.connection_id::text);
    RETURN NULL;
END $$ LANGUAGE plpgsql;

CREATE TRIGGER connection_limits_notify AFTER INSERT OR UPDATE OR DELETE ON connection_limits
    FOR EACH ROW EXECUTE FUNCTION notify_connection_limits();
