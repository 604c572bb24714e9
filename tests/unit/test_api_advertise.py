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


def test_workers_reached_on_this_machine_only_listen_and_advertise_on_loopback() -> None:
    from proxyorch.supervisor import worker_api_addresses

    ports, bind, host = worker_api_addresses(load_settings({"WORKERS": "3", "BIND_HOST": "0.0.0.0"}))
    assert (bind, host) == ("127.0.0.1", "127.0.0.1") and len(set(ports)) == 3 and all(ports)


def test_workers_of_a_cluster_across_machines_advertise_api_advertise_s_host_on_fixed_ports() -> None:
    from proxyorch.supervisor import worker_api_addresses

    s = load_settings({"WORKERS": "3", "BIND_HOST": "10.0.0.5", "API_ADVERTISE": "http://node-a.example:8000",
                       "INTERNAL_API_PORT": "9100"})
    assert worker_api_addresses(s) == ([9100, 9101, 9102], "10.0.0.5", "node-a.example")
    v6 = load_settings({"WORKERS": "2", "BIND_HOST": "::", "API_ADVERTISE": "http://[fd00::5]:8000"})
    assert worker_api_addresses(v6)[1:] == ("::", "[fd00::5]")


@pytest.mark.parametrize(("env", "problem"), [
    ({"INTERNAL_API_PORT": "65535"}, "INTERNAL_API_PORT + WORKERS - 1 must be at most 65535 (got 65536)"),
    ({"INTERNAL_API_PORT": "9000", "API_PORT": "9001"}, "API_PORT (9001) is in the workers' INTERNAL_API_PORT range 9000-9001"),
    ({"INTERNAL_API_PORT": "9000", "RELAY_PORT": "9001"},
     "the workers' RELAY_PORT range 9001-9002 and INTERNAL_API_PORT range 9000-9001 overlap"),
])
def test_a_supervisor_refuses_worker_port_ranges_that_clash(env: dict, problem: str) -> None:
    s = load_settings({"WORKERS": "2", "PROXY_PORT": "1080", "TUNNEL_PORT": "7000", "API_PORT": "8000", **env})
    assert problem in problems(s, supervisor=True)
