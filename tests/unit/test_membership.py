"""Node membership: joins, silence, Ray's death notice, suspicion."""

from __future__ import annotations

from smss.cluster.membership import Membership, is_gateway_node


def test_nodes_join_once_and_leave_by_silence_or_by_ray() -> None:
    m = Membership(node_timeout_s=5.0, fresh_s=1.2)
    assert m.joining({"a", "b"}, starting={"b"}) == ["a"]
    m.register("a", 0.0)
    m.register("b", 0.0)
    assert m.joining({"a", "b"}) == []
    assert m.heartbeat("a", 4.0)
    assert m.gone({"a", "b"}, 5.5) == ["b"]  # silent for 5.5 s
    assert m.gone({"b"}, 4.5) == ["a"]  # Ray lists it dead
    m.drop("b")
    assert not m.heartbeat("b", 6.0)  # a late agent of a dropped node is not taken back


def test_only_fresh_unsuspected_nodes_are_offered() -> None:
    m = Membership(node_timeout_s=5.0, fresh_s=1.2)
    m.register("a", 0.0)
    m.register("b", 0.0)
    assert m.fresh(1.0) == {"a", "b"}
    assert m.fresh(2.0) == set()
    m.heartbeat("a", 2.0)
    m.heartbeat("b", 2.0)
    m.suspect("b", 2.1)
    assert m.fresh(2.2) == {"a"}
    m.heartbeat("b", 2.5)  # a heartbeat of a node dying in parts does not clear it
    assert m.fresh(2.6) == {"a"}
    m.cleared("b")  # its agent answered a ping
    assert m.fresh(2.6) == {"a", "b"}


def test_gateway_nodes_are_named_by_id_or_ip() -> None:
    assert is_gateway_node("n1", "10.0.0.1", ())
    assert is_gateway_node("n1", "10.0.0.1", ("n1",))
    assert is_gateway_node("n1", "10.0.0.1", ("10.0.0.1",))
    assert not is_gateway_node("n2", "10.0.0.2", ("n1", "10.0.0.1"))
