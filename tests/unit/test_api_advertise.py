"""API_ADVERTISE: the API address a node publishes with its heartbeat (for the sessions fan-out)."""

from __future__ import annotations

import pytest

from proxyorch.cluster import ClusterRouting
from proxyorch.cluster_config import problems
from proxyorch.config import load_settings


@pytest.mark.parametrize("bad", ["ftp://x:1", "127.0.0.1:8000", "http://h:1/api", "http://:8000"])
def test_a_malformed_api_advertise_is_refused_with_the_reason(bad: str) -> None:
    assert f"API_ADVERTISE must look like http://HOST:PORT (got {bad!r})" in problems(load_settings({"API_ADVERTISE": bad}))


def test_a_well_formed_api_advertise_is_accepted() -> None:
    assert not [p for p in problems(load_settings({"API_ADVERTISE": "https://10.0.0.5:8443/"})) if "API_ADVERTISE" in p]


def test_the_advertised_api_defaults_to_loopback_and_api_port() -> None:
    assert ClusterRouting(load_settings({"API_PORT": "8123"}), None, None).api_address() == "http://127.0.0.1:8123"
    advertised = ClusterRouting(load_settings({"API_ADVERTISE": "http://10.0.0.5:8000/"}), None, None).api_address()
    assert advertised == "http://10.0.0.5:8000"
