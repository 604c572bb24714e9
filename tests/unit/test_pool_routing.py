"""Choosing a pool member: fewest active sessions, sticky tokens with a TTL, country narrowing."""

from __future__ import annotations

from proxy.pool_routing import PoolRouter
from proxy.rotation_gate import RotationGate
from proxy.username_params import RouteParams

CID = "0f8fad5b-d9cb-469f-a165-70867728950e"
POOL = (("a", "US"), ("b", "US"), ("c", "DE"))
PLAIN = RouteParams(CID)


def everyone(_device: str) -> bool:
    return True


def test_new_sessions_go_to_the_least_loaded_member():
    r = PoolRouter()
    leases = [r.choose(CID, POOL, PLAIN, everyone, 0.0) for _ in range(6)]
    assert [x.device_id for x in leases] == ["a", "b", "c", "a", "b", "c"]
    r.release(leases[1], 1.0)
    r.release(leases[4], 1.0)
    assert r.choose(CID, POOL, PLAIN, everyone, 1.0).device_id == "b"
    assert r.load == {"a": 2, "b": 1, "c": 2}


def test_unusable_members_are_skipped_and_none_usable_gives_none():
    r = PoolRouter()
    assert r.choose(CID, POOL, PLAIN, lambda d: d == "c", 0.0).device_id == "c"
    assert r.choose(CID, POOL, PLAIN, lambda d: False, 0.0) is None
    assert r.choose(CID, (), PLAIN, everyone, 0.0) is None


def test_country_narrows_the_pool_case_insensitively():
    r = PoolRouter()
    de = RouteParams(CID, country="DE")
    assert {r.choose(CID, POOL, de, everyone, 0.0).device_id for _ in range(3)} == {"c"}
    assert r.choose(CID, (("x", "de"),), de, everyone, 0.0).device_id == "x"
    assert r.choose(CID, (("y", None),), de, everyone, 0.0) is None


def test_sticky_token_keeps_its_device_until_ttl_after_its_last_session():
    r = PoolRouter()
    sticky = RouteParams(CID, session="s1", ttl=10)
    first = r.choose(CID, POOL, sticky, everyone, 0.0)
    r.choose(CID, POOL, PLAIN, everyone, 0.0)  # load elsewhere does not move the token
    second = r.choose(CID, POOL, sticky, everyone, 1.0)
    assert first.device_id == second.device_id == "a"
    r.release(first, 2.0)
    r.release(second, 3.0)  # the token's last session ended at t=3
    assert r.bound_device(CID, "s1", 12.9) == "a"
    late = r.choose(CID, POOL, sticky, everyone, 12.9)
    assert late.device_id == "a"
    r.release(late, 12.9)
    r.release(r.choose(CID, POOL, sticky, everyone, 13.0), 13.0)
    assert r.bound_device(CID, "s1", 23.0) is None  # ttl passed: free choice again
    again = r.choose(CID, POOL, sticky, everyone, 23.5)
    assert again.device_id in {"a", "b", "c"}


def test_sticky_token_moves_when_its_device_goes_offline_and_then_sticks_there():
    r = PoolRouter()
    sticky = RouteParams(CID, session="s2")
    assert r.choose(CID, POOL, sticky, everyone, 0.0).device_id == "a"
    online = {"b", "c"}
    moved = r.choose(CID, POOL, sticky, lambda d: d in online, 1.0).device_id
    assert moved in online
    assert r.choose(CID, POOL, sticky, everyone, 2.0).device_id == moved  # even once "a" is back


def test_tokens_are_per_connection_and_purged_when_expired():
    r = PoolRouter()
    other = "11111111-2222-4333-8444-555555555555"
    lease = r.choose(CID, POOL, RouteParams(CID, session="t", ttl=5), everyone, 0.0)
    r.choose(other, POOL, RouteParams(other, session="t", ttl=5), everyone, 0.0)
    assert r.bound_device(other, "t", 0.0) == "b"  # "a" had one session: the other connection's token went to "b"
    r.release(lease, 1.0)
    r.purge(5.9)
    assert len(r) == 2
    r.purge(6.1)
    assert len(r) == 1  # the other token still has a session


def test_rotation_gate_resumes_waiters_in_order_and_cancels():
    gate = RotationGate()
    seen: list[str] = []
    assert not gate.is_rotating("d") and not gate.is_rotating(None)
    gate.begin("d")
    assert gate.is_rotating("d")
    gate.wait("d", lambda: seen.append("one"))
    cancel = gate.wait("d", lambda: seen.append("two"))
    gate.wait("d", lambda: seen.append("three"))
    cancel()
    cancel()  # twice is harmless
    assert gate.waiting("d") == 2
    assert gate.end("d") == 2 and seen == ["one", "three"]
    assert not gate.is_rotating("d") and gate.end("d") == 0


def test_rotating_members_are_avoided_unless_nothing_else_is_usable_but_sticky_tokens_wait_for_them():
    r = PoolRouter()
    rotating = {"a"}
    sticky = RouteParams(CID, session="s3")
    assert r.choose(CID, POOL, sticky, everyone, 0.0).device_id == "a"  # bound before the rotation
    assert r.choose(CID, POOL, PLAIN, everyone, 1.0, rotating.__contains__).device_id == "b"
    assert r.choose(CID, POOL, sticky, everyone, 1.0, rotating.__contains__).device_id == "a"  # waits there
    only_a = (("a", "US"),)
    assert r.choose(CID, only_a, PLAIN, everyone, 1.0, rotating.__contains__).device_id == "a"


def test_another_nodes_binding_wins_while_usable_and_release_reports_when_the_token_goes_idle():
    r = PoolRouter()
    sticky = RouteParams(CID, session="xyz", ttl=30)
    # this node would pick "a" (pool order); the cluster says the token is bound to "c"
    lease = r.choose(CID, POOL, sticky, everyone, 0.0, hint="c")
    assert lease.device_id == "c"
    again = r.choose(CID, POOL, sticky, everyone, 1.0)  # no hint now: the adopted binding holds
    assert again.device_id == "c"
    assert r.release(lease, 2.0) is None        # one session of the token left
    assert r.release(again, 3.0) == 30          # the last one: idle, expires ttl from now
    assert r.bound_device(CID, "xyz", 32.9) == "c" and r.bound_device(CID, "xyz", 33.1) is None
    # a hint that is not a usable member is ignored
    assert r.choose(CID, POOL, sticky, lambda d: d != "b", 4.0, hint="b").device_id == "c"
    assert r.choose(CID, POOL, sticky, everyone, 5.0, hint="elsewhere").device_id == "c"
