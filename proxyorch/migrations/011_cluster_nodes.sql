-- Live nodes of a cluster without Redis (presence falls back to PostgreSQL): name, the relay
-- address the other nodes dial, and a heartbeat. A row older than PRESENCE_TTL_S is a dead node.
CREATE TABLE IF NOT EXISTS cluster_nodes (
    name      text PRIMARY KEY,
    relay     text,
    last_seen timestamptz NOT NULL DEFAULT now()
);
