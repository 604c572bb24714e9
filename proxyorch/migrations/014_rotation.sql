-- Mobile exits (issue 17): the device's public IP and rotation, and connections routed to a pool.

ALTER TABLE devices ADD COLUMN public_ip text;
ALTER TABLE devices ADD COLUMN last_rotated_at timestamptz;
ALTER TABLE devices ADD COLUMN rotation_interval_s integer CHECK (rotation_interval_s IS NULL OR rotation_interval_s > 0);
ALTER TABLE devices ADD COLUMN rotation_since timestamptz;  -- when the timer was set (first due then + interval)

-- Every rotation of a device's public IP, by the API or by its timer.
CREATE TABLE device_rotations (
    id                bigserial PRIMARY KEY,
    remote_device_id  uuid NOT NULL REFERENCES devices(remote_device_id) ON DELETE CASCADE,
    old_ip            text,
    new_ip            text,
    changed           boolean NOT NULL,
    trigger           text NOT NULL CHECK (trigger IN ('api', 'timer')),
    started_at        timestamptz NOT NULL,
    took_ms           integer NOT NULL,
    error             text
);
CREATE INDEX device_rotations_device ON device_rotations(remote_device_id, started_at DESC, id DESC);

-- A connection may route to a pool instead of one device: explicit members, or the owner's devices
-- of one country. Changing these columns fires proxy_credentials_notify (auth caches invalidated).
ALTER TABLE proxy_credentials ADD COLUMN pool_device_ids uuid[];
ALTER TABLE proxy_credentials ADD COLUMN pool_country text;

-- Dissociation (kill: terminate sessions) is "no device and no pool left"; moving a connection
-- between a device and a pool is a re-association (conn:, live sessions keep their device).
CREATE OR REPLACE FUNCTION notify_proxy_credentials() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('proxy_invalidate', 'kill:' || OLD.connection_id::text);
    ELSIF TG_OP = 'UPDATE'
          AND (OLD.device_id IS NOT NULL OR OLD.pool_device_ids IS NOT NULL OR OLD.pool_country IS NOT NULL)
          AND NEW.device_id IS NULL AND NEW.pool_device_ids IS NULL AND NEW.pool_country IS NULL THEN
        PERFORM pg_notify('proxy_invalidate', 'kill:' || NEW.connection_id::text);
    ELSE
        PERFORM pg_notify('proxy_invalidate', 'conn:' || NEW.connection_id::text);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
