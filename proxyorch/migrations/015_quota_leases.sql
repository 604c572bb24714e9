-- Quota leases (issue 16): a node relays a quota'd connection's bytes only out of a lease it took from the
-- connection's usage row under that row's lock, so the nodes of a cluster together never relay a byte past
-- the quota. A lease row holds what the node was granted and has not flushed as used bytes yet (its unused
-- lease plus its unflushed usage). The node renews its rows with every usage flush; a row whose node died
-- stops counting at expires_at, so a dead node never blocks the quota for long.
CREATE TABLE connection_quota_leases (
    connection_id  uuid NOT NULL,
    period         text NOT NULL,
    period_start   timestamptz NOT NULL,
    node           text NOT NULL,
    bytes          bigint NOT NULL CHECK (bytes >= 0),
    expires_at     timestamptz NOT NULL,
    PRIMARY KEY (connection_id, period, period_start, node)
);
CREATE INDEX connection_quota_leases_node ON connection_quota_leases(node);

-- Grant up to p_want bytes of p_quota to p_node: what the quota leaves after the used bytes and every live
-- lease (the node's own included). Returns the grant, the used bytes and the other nodes' live leases.
CREATE FUNCTION quota_lease(p_conn uuid, p_period text, p_start timestamptz, p_node text, p_want bigint,
                            p_quota bigint, p_ttl double precision,
                            OUT granted bigint, OUT used bigint, OUT others bigint) AS $$
DECLARE mine bigint;
BEGIN
    INSERT INTO connection_usage(connection_id, period, period_start, used_bytes)
        VALUES (p_conn, p_period, p_start, 0) ON CONFLICT DO NOTHING;
    SELECT u.used_bytes INTO used FROM connection_usage u
        WHERE u.connection_id = p_conn AND u.period = p_period AND u.period_start = p_start FOR UPDATE;
    DELETE FROM connection_quota_leases l WHERE l.connection_id = p_conn AND l.period = p_period
        AND l.period_start = p_start AND l.expires_at < now() - interval '1 minute';
    SELECT coalesce(sum(l.bytes) FILTER (WHERE l.node <> p_node AND l.expires_at > now()), 0),
           coalesce(sum(l.bytes) FILTER (WHERE l.node = p_node), 0)
        INTO others, mine FROM connection_quota_leases l
        WHERE l.connection_id = p_conn AND l.period = p_period AND l.period_start = p_start;
    -- at most half of what is left (and 64 KiB at least), so a node never takes the last of a quota at once
    granted := greatest(0, least(p_want, p_quota - used - others - mine,
                                 greatest(65536, (p_quota - used - others - mine) / 2)));
    INSERT INTO connection_quota_leases(connection_id, period, period_start, node, bytes, expires_at)
        VALUES (p_conn, p_period, p_start, p_node, granted, now() + make_interval(secs => p_ttl))
        ON CONFLICT (connection_id, period, period_start, node) DO UPDATE
        SET bytes = connection_quota_leases.bytes + granted, expires_at = EXCLUDED.expires_at;
END $$ LANGUAGE plpgsql;
