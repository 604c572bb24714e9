-- Migration 1: the request log and bandwidth rollups as first deployed (the former schema.sql).
-- Every statement is idempotent, so deployments that predate the migrations table take it as a no-op.
-- {retention_days} is LOG_RETENTION_DAYS. The same SQL runs on a ClickHouse server and on chDB.

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
