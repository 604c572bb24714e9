"""The client SDK: the implementation lives in ``device_tunnel.sdk`` (it ships in the agent distribution,
standard library only); this module keeps the full install's import path."""

from device_tunnel.sdk import (
    Agent,
    AgentInfo,
    AgentUtils,
    BucketUtils,
    DeviceBucketUtils,
    JobUtils,
    Result,
    UserClient,
    http_request,
)

__all__ = ["Agent", "AgentInfo", "AgentUtils", "BucketUtils", "DeviceBucketUtils", "JobUtils", "Result",
           "UserClient", "http_request"]
