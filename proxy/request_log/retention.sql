-- Applied at every start-up after the migrations: follow LOG_RETENTION_DAYS when it changes
-- (metadata only: run with materialize_ttl_after_modify = 0).
ALTER TABLE proxyorch.request_log MODIFY TTL toDateTime(timestamp) + INTERVAL {retention_days} DAY;
ALTER TABLE proxyorch.traffic_delta MODIFY TTL toDateTime(timestamp) + INTERVAL {retention_days} DAY;
ALTER TABLE proxyorch.bandwidth_hourly MODIFY TTL hour + INTERVAL {retention_days} DAY;
