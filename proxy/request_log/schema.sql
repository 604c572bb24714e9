-- Request log and bandwidth rollups. Applied at every start-up by ClickHouse.apply_schema();
-- every statement is idempotent. {retention_days} is LOG_RETENTION_DAYS.
-- The same SQL runs on a ClickHouse server and on the embedded chDB engine.

CREATE DATABASE IF NOT EXISTS proxyorch;

-- One row per SOCKS5 / HTTP CONNECT attempt, written when the session ends (byte totals).
-- bytesIn = target -> client (download), bytesOut = client -> target.
CREATE TABLE IF NOT EXISTS proxyorch.request_log
(
    timestamp    DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    connectionId String,
    deviceId     LowCardinality(String),
    serverNode   LowCardinality(String),
    target       String,
    targetType   LowCardinality(String),
    port         UInt16,
    resolvedIp   String,
    action       LowCardinality(String),
    blockReason  LowCardinality(String),
    bytesIn      UInt64,
    bytesOut     UInt64,
    durationMs   UInt64,
    clientAddr   String,
    protocol     LowCardinality(String),
    replyCode    UInt16,
    error        String,
    domain       String,          -- registrable domain of the target (proxy/request_log/domains.py)
    deviceNode   LowCardinality(String), -- node holding the device's tunnel (= serverNode unless relayed)
    INDEX idx_connection connectionId TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_target lower(target) TYPE ngrambf_v1(3, 8192, 2, 0) GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(timestamp)
ORDER BY (deviceId, connectionId, timestamp)
TTL toDateTime(timestamp) + INTERVAL {retention_days} DAY
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

-- Byte deltas: interim ones every BANDWIDTH_FLUSH_S while a session is open, the remainder at
-- close, so that per session sum(deltas) == the request_log totals. Feeds the rollups only.
CREATE TABLE IF NOT EXISTS proxyorch.traffic_delta
(
    timestamp    DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    deviceId     LowCardinality(String),
    connectionId String,
    bytesIn      UInt64,
    bytesOut     UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(timestamp)
ORDER BY (deviceId, connectionId, timestamp)
TTL toDateTime(timestamp) + INTERVAL {retention_days} DAY
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

-- Hourly rollup, kept as long as the raw log. Read with sum(): rows merge in the background.
CREATE TABLE IF NOT EXISTS proxyorch.bandwidth_hourly
(
    hour         DateTime('UTC'),
    deviceId     LowCardinality(String),
    connectionId String,
    bytesIn      UInt64,
    bytesOut     UInt64
)
ENGINE = SummingMergeTree((bytesIn, bytesOut))
PARTITION BY toYYYYMM(hour)
ORDER BY (deviceId, connectionId, hour)
TTL hour + INTERVAL {retention_days} DAY
SETTINGS non_replicated_deduplication_window = 10000;

-- Daily rollup, kept forever (it is small): lifetime totals come from here.
CREATE TABLE IF NOT EXISTS proxyorch.bandwidth_daily
(
    day          Date,
    deviceId     LowCardinality(String),
    connectionId String,
    bytesIn      UInt64,
    bytesOut     UInt64
)
ENGINE = SummingMergeTree((bytesIn, bytesOut))
PARTITION BY toYYYYMM(day)
ORDER BY (deviceId, connectionId, day)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS proxyorch.bandwidth_hourly_mv TO proxyorch.bandwidth_hourly AS
SELECT toStartOfHour(timestamp) AS hour, deviceId, connectionId,
       sum(bytesIn) AS bytesIn, sum(bytesOut) AS bytesOut
FROM proxyorch.traffic_delta
GROUP BY hour, deviceId, connectionId;

CREATE MATERIALIZED VIEW IF NOT EXISTS proxyorch.bandwidth_daily_mv TO proxyorch.bandwidth_daily AS
SELECT toDate(timestamp) AS day, deviceId, connectionId,
       sum(bytesIn) AS bytesIn, sum(bytesOut) AS bytesOut
FROM proxyorch.traffic_delta
GROUP BY day, deviceId, connectionId;

-- Tables made before the `domain` column: add it (old rows read as '' and group by their host).
ALTER TABLE proxyorch.request_log ADD COLUMN IF NOT EXISTS domain String AFTER error;
-- Tables made before the `deviceNode` column (old rows read as '').
ALTER TABLE proxyorch.request_log ADD COLUMN IF NOT EXISTS deviceNode LowCardinality(String) AFTER domain;

-- Follow LOG_RETENTION_DAYS when it changes (metadata only: run with materialize_ttl_after_modify = 0).
ALTER TABLE proxyorch.request_log MODIFY TTL toDateTime(timestamp) + INTERVAL {retention_days} DAY;
ALTER TABLE proxyorch.traffic_delta MODIFY TTL toDateTime(timestamp) + INTERVAL {retention_days} DAY;
ALTER TABLE proxyorch.bandwidth_hourly MODIFY TTL hour + INTERVAL {retention_days} DAY;
