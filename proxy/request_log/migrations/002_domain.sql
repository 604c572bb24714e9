-- The registrable domain of each attempt's target (proxy/request_log/domains.py, public suffix list,
-- ICANN section), grouped by GET /api/v2/proxy/domains. Rows from before it read as '' and group
-- by their bare host.
ALTER TABLE proxyorch.request_log ADD COLUMN IF NOT EXISTS domain String AFTER error;
