-- The API address each node advertises (API_ADVERTISE) next to its relay address: the other nodes
-- call its /internal/ endpoints there (e.g. the cluster-wide list of open sessions).
ALTER TABLE cluster_nodes ADD COLUMN IF NOT EXISTS api text;
