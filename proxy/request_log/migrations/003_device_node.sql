-- The node holding the device's tunnel (issue 13): differs from serverNode when the session was
-- relayed to another node. Rows from before it were never relayed, so they read as their serverNode.
ALTER TABLE proxyorch.request_log ADD COLUMN IF NOT EXISTS deviceNode LowCardinality(String) DEFAULT serverNode AFTER domain;
