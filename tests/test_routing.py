"""Membership and the flood together, in memory and virtual time: adaptive TTL, routes, the dead."""

from meshchat.membership import PeerDown

from meshsim import MemberMesh, label_of, line, random_edges


def test_adaptive_ttl_reaches_the_far_end_of_a_10_node_line():
    mesh = MemberMesh(10, line(10), ttl=0)  # ttl 0: adaptive, as `meshchat` runs by default
    mesh.advance(15.0)  # links come up, everyone announces itself once
    [msg] = mesh.originate(1, "to the end")
    mesh.run()
    assert msg.ttl == 9 + 2  # the farthest node is 9 hops away, plus slack
    assert [m.body for m in mesh.shown[10]] == ["to the end"]


def test_an_unknown_mesh_gets_the_seeds_ttl():
    mesh = MemberMesh(2, line(2), ttl=0)
    [msg] = mesh.originate(1, "early")
    assert msg.ttl == 8


def settled_mesh(n=30, seed=3):
    mesh = MemberMesh(n, random_edges(n, 4, seed), seed=seed, ttl=0)
    mesh.advance(15.0)
    return mesh


def test_a_direct_message_costs_a_tenth_of_a_broadcast_at_equal_delivery():
    mesh = settled_mesh()
    before = mesh.flooded()
    mesh.originate(1, "everyone")
    mesh.run()
    broadcast = mesh.flooded() - before
    assert all([m.body for m in mesh.shown[i]] == ["everyone"] for i in range(2, 31))
    before = mesh.flooded()
    mesh.originate(1, "just you", dst=label_of(17))
    mesh.run()
    direct = mesh.flooded() - before
    assert [m.body for m in mesh.shown[17]][-1] == "just you"
    assert direct * 10 < broadcast, (direct, broadcast)


def test_a_direct_message_still_arrives_when_a_node_on_its_path_dies():
    mesh = settled_mesh()
    mark = len(mesh.carried)
    mesh.originate(1, "first", dst=label_of(17))
    mesh.run()
    path = [b for a, b, kind in mesh.carried[mark:] if kind == "CHAT" and b != 17]
    assert path, "the message went straight to its destination: no node in between to kill"
    victim = path[0]
    mesh.dead.add(victim)
    mesh.advance(30.0)  # the dead node's neighbours notice: down within 30 s
    assert any(isinstance(e, PeerDown) and e.label == label_of(victim) for i in mesh.relays
               for e in mesh.events[i] if i != victim)
    mesh.originate(1, "second", dst=label_of(17))
    mesh.run()
    assert [m.body for m in mesh.shown[17]] == ["first", "second"]


def test_a_direct_message_to_an_unknown_node_floods_like_before():
    mesh = settled_mesh()
    before = mesh.flooded()
    mesh.originate(1, "anyone there?", dst="10.0.0.99:9000")
    mesh.run()
    assert mesh.flooded() - before > 30
