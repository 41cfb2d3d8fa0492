"""Signed origins and pinned keys: trust.py alone, a relay with it, a node across a restart, and the
base install without cryptography."""

import os
import queue
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from meshchat import crypto
from meshchat.node import History, Node, Security
from meshchat.membership import MembershipConfig
from meshchat.relay import Display, Notice, Relay, RelayConfig
from meshchat.trust import BAD_SIGNATURE, KEY_CHANGED, UNSIGNED, VERIFIED, PinKey, Trust, signer, signing_bytes
from meshchat.wire import Message, decode, encode

pytestmark = pytest.mark.skipif(not crypto.available(), reason="needs the secure extra")

ALICE = "127.0.0.1:9001"
ME = "127.0.0.1:9000"
NEIGHBOUR = ("127.0.0.1", 9005)
WALL = 1_700_000_000.0


def new_trust(pins=None) -> Trust:
    return Trust(crypto.verify, crypto.unb64, crypto.fingerprint, pins)


def chat(sign, mid="m1", body="hi", src=ALICE, ts=WALL, ttl=5) -> Message:
    return sign(Message(mid, ts, ttl, "CHAT", src, "", body, {}))


@pytest.fixture(scope="module")
def keys():
    a, b = crypto.Identity(bytes([1]) * 32), crypto.Identity(bytes([2]) * 32)  # seeded: the same signatures every run
    return a, b, signer(a.key_text, a.sign), signer(b.key_text, b.sign)


def test_signing_bytes_cover_every_field_but_ttl_and_sig(keys):
    _, _, sign_a, _ = keys
    m = chat(sign_a)
    assert signing_bytes(m) == signing_bytes(m._replace(ttl=1))
    for changed in (m._replace(body="ho"), m._replace(ts=WALL + 1), m._replace(extra=dict(m.extra, new=1))):
        assert signing_bytes(changed) != signing_bytes(m)
    # The encoding relays use (any key order, ttl rewritten) still verifies.
    t = new_trust()
    assert t.check(decode(encode(m._replace(ttl=2))), 0.0)[0] == VERIFIED


def test_pinned_on_first_use_then_a_changed_key_is_refused_and_told_then_trusted(keys):
    a, b, sign_a, sign_b = keys
    t = new_trust()
    verdict, out = t.check(chat(sign_a), 0.0)
    assert verdict == VERIFIED and out == [PinKey(ALICE, a.key_text)]
    verdict, out = t.check(chat(sign_b, mid="m2"), 1.0)
    assert verdict == KEY_CHANGED and len(out) == 1
    assert a.fingerprint in out[0] and b.fingerprint in out[0] and f"/trust {ALICE}" in out[0]
    assert t.check(chat(sign_b, mid="m3"), 2.0) == (KEY_CHANGED, [])  # told once a minute, not per message
    assert t.check(chat(sign_a, mid="m4"), 3.0)[0] == VERIFIED  # the pinned key still works
    pin, text = t.accept(ALICE)
    assert pin == PinKey(ALICE, b.key_text) and b.fingerprint in text
    assert t.check(chat(sign_b, mid="m5"), 4.0)[0] == VERIFIED
    assert t.check(chat(sign_a, mid="m6"), 5.0)[0] == KEY_CHANGED
    assert t.accept("127.0.0.1:1")[0] is None


def test_unsigned_bad_and_malformed_signatures(keys):
    _, _, sign_a, _ = keys
    t = new_trust()
    assert t.check(Message("m", WALL, 5, "CHAT", ALICE, "", "hi"), 0.0)[0] == UNSIGNED
    m = chat(sign_a)
    assert t.check(m._replace(body="forged"), 0.0)[0] == BAD_SIGNATURE
    for key, sig in ((None, m.extra["sig"]), (m.extra["key"], None), ("", ""), (m.extra["key"][:-1], m.extra["sig"]),
                     (m.extra["key"], m.extra["sig"][:-2] + ("AA" if m.extra["sig"][-2:] != "AA" else "BA")), (1, 2), ("*" * 43, m.extra["sig"]),
                     (m.extra["key"], "x" * 10_000)):
        extra = {k: v for k, v in (("key", key), ("sig", sig)) if v is not None}
        assert t.check(m._replace(extra=extra), 0.0)[0] == BAD_SIGNATURE
    assert not t.pins


def test_pins_are_bounded_and_never_pushed_out(keys):
    _, _, sign_a, _ = keys
    t = Trust(crypto.verify, crypto.unb64, crypto.fingerprint, max_pins=2)
    for i in range(2):
        assert t.check(chat(sign_a, src=f"127.0.0.1:{9100 + i}"), 0.0)[0] == VERIFIED
    assert t.check(chat(sign_a, src="127.0.0.1:9200"), 0.0)[0] == UNSIGNED  # shown unverified, not pinned
    assert set(t.pins) == {"127.0.0.1:9100", "127.0.0.1:9101"} and t.counters["pins_full"] == 1


def secure_relay(**cfg) -> Relay:
    return Relay(RelayConfig(ME, **cfg), peers=[NEIGHBOUR], trust=new_trust())


def shown(actions):
    return [a for a in actions if isinstance(a, Display)]


def test_relay_a_forged_copy_sent_first_does_not_silence_the_real_one(keys):
    _, _, sign_a, sign_b = keys
    r = secure_relay()
    r.datagram_received(encode(chat(sign_a, mid="first")), NEIGHBOUR, 0.0, WALL)  # pins alice's key
    real = chat(sign_a, mid="m2", body="real")
    forged = real._replace(body="forged")  # alice's key and signature, another body
    impostor = chat(sign_b, mid="m2", body="impostor")  # a key of its own, claiming alice's src
    assert r.datagram_received(encode(forged), NEIGHBOUR, 1.0, WALL) == []
    out = r.datagram_received(encode(impostor), NEIGHBOUR, 1.0, WALL)
    assert not shown(out) and any(isinstance(a, Notice) and "changed" in a.text for a in out)
    out = r.datagram_received(encode(real), NEIGHBOUR, 1.0, WALL)
    assert [d.message.body for d in shown(out)] == ["real"] and shown(out)[0].verified is True
    s = r.stats()
    assert s["dropped_bad_signature"] == 1 and s["dropped_key_changed"] == 1 and s["relayed"] == 0
    assert s["received"] == s["handled"] + sum(v for k, v in s.items() if k.startswith("dropped_"))


def test_relay_unsigned_shown_unverified_unless_required(keys):
    seed = Message("s1", WALL, 5, "CHAT", ALICE, "", "from a seed node")
    out = secure_relay().datagram_received(encode(seed), NEIGHBOUR, 0.0, WALL)
    assert shown(out)[0].verified is False
    r = secure_relay(require_signed=True)
    assert r.datagram_received(encode(seed), NEIGHBOUR, 0.0, WALL) == []
    assert r.stats()["dropped_unsigned"] == 1
    # Without a trust layer nothing is judged: verified is None, and the console marks nothing.
    assert shown(Relay(RelayConfig(ME), peers=[NEIGHBOUR]).datagram_received(encode(seed), NEIGHBOUR, 0.0, WALL))[
        0].verified is None


def test_relay_signs_what_it_originates_and_a_receiver_verifies_it(keys):
    a, _, sign_a, _ = keys
    sender = Relay(RelayConfig(ALICE), peers=[("127.0.0.1", 9000)], trust=new_trust(), sign=sign_a)
    messages, sends = sender.originate("CHAT", "x" * 3000, "", 0.0, WALL)  # split into parts, each signed
    assert len(messages) > 1 and all(len(s.data) <= 1400 for s in sends)
    r = secure_relay()
    for s in sends:
        out = r.datagram_received(s.data, NEIGHBOUR, 0.0, WALL)
        assert shown(out)[0].verified is True
    assert r.trust.fingerprint_of(ALICE) == a.fingerprint


def test_replay_after_the_seen_cache_forgot_it_is_not_shown(keys):
    _, _, sign_a, _ = keys
    r = secure_relay(seen_ttl_s=10.0, max_skew_s=5.0)
    data = encode(chat(sign_a))
    assert shown(r.datagram_received(data, NEIGHBOUR, 0.0, WALL))
    r.expire(11.0)
    assert "m1" not in r.seen
    assert r.datagram_received(data, NEIGHBOUR, 11.0, WALL + 4.0) == []  # within --max-skew still
    assert r.stats()["dropped_replay"] == 1


def _node(tmp_path, events, port=0):
    # The data dir is per label, so a restart keeps its port.
    return Node(RelayConfig(""), port=port, membership=MembershipConfig(label=""),
                history=History(data_dir=str(tmp_path)), security=Security(), on_event=events.put)


def _wait_display(events):
    while True:
        e = events.get(timeout=10)
        if isinstance(e, Display):
            return e


def test_replay_after_a_restart_is_not_shown_and_pins_and_identity_survive(tmp_path, keys):
    a, _, sign_a, _ = keys
    events: "queue.Queue[object]" = queue.Queue()
    node = _node(tmp_path, events).start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        src = f"127.0.0.1:{sock.getsockname()[1]}"
        captured = encode(sign_a(Message("cap1", time.time(), 5, "CHAT", src, "", "once", {})))
        sock.sendto(captured, node.addr)
        first = _wait_display(events)
        assert first.message.body == "once" and first.verified is True
        fingerprint = node.identity.fingerprint
        node.stop()
        events = queue.Queue()
        node = _node(tmp_path, events, node.addr[1]).start()
        assert node.identity.fingerprint == fingerprint  # the same identity after a restart
        assert node.trust.fingerprint_of(src) == a.fingerprint  # and the pin
        sock.sendto(captured, node.addr)  # the replay, then a fresh one: only the fresh one shows
        sock.sendto(encode(sign_a(Message("new1", time.time(), 5, "CHAT", src, "", "fresh", {}))), node.addr)
        assert _wait_display(events).message.body == "fresh"  # the first shown: the replay was not
    finally:
        sock.close()
        node.stop()


def test_identity_file_is_private_and_a_corrupt_one_is_an_error_never_replaced(tmp_path):
    path = tmp_path / "id.key"
    ident, created = crypto.Identity.load_or_create(path)
    assert created and crypto.Identity.load_or_create(path)[0].fingerprint == ident.fingerprint
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600
    path.write_bytes(b"not a key\n")
    with pytest.raises(crypto.IdentityError, match="not a meshchat key"):
        crypto.Identity.load_or_create(path)
    assert path.read_bytes() == b"not a key\n"


def _run_cli(args, tmp_path, no_crypto=False):
    env = dict(os.environ)
    if no_crypto:
        # A sitecustomize that makes `import cryptography` fail: the base install.
        (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
            import sys
            class _NoCrypto:
                def find_spec(self, name, path=None, target=None):
                    if name == "cryptography" or name.startswith("cryptography."):
                        raise ImportError("no cryptography here")
            sys.meta_path.insert(0, _NoCrypto())
        """))
        env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "meshchat", *args], capture_output=True, text=True, timeout=30,
                          env=env, input="")


@pytest.mark.parametrize("option", [["--identity", "x.key"], ["--require-signed"]])
def test_base_install_key_options_exit_2_with_one_line(tmp_path, option):
    r = _run_cli(option + ["--no-discover", "--port", "0", "--no-history", "--json"], tmp_path, no_crypto=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "pip install 'meshchat[secure]'" in r.stderr


def test_base_install_still_runs_and_whoami_says_no_key(tmp_path):
    r = _run_cli(["--no-discover", "--port", "0", "--no-history", "--json"], tmp_path, no_crypto=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert '"fingerprint"' not in r.stdout.splitlines()[0]


def test_corrupt_identity_file_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("garbage")
    r = _run_cli(["--identity", str(bad), "--no-discover", "--port", "0", "--no-history"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "not a meshchat key" in r.stderr
    assert bad.read_text() == "garbage"


def test_a_seed_node_still_chats_with_a_signing_node_shown_unverified(tmp_path):
    from seednode import SeedNode

    events: "queue.Queue[object]" = queue.Queue()
    node = Node(RelayConfig(""), membership=MembershipConfig(label=""), security=Security(),
                on_event=events.put).start()
    try:
        with SeedNode([node.addr]) as seed:
            node.add_peer(seed.addr)
            seed.send("hello from the seed design")
            got = _wait_display(events)
            assert got.message.body == "hello from the seed design" and got.verified is False
            node.say("and back, signed", dst=seed.label)
            assert seed.shown.get(timeout=5)["body"] == "and back, signed"  # our key and sig do not bother it
    finally:
        node.stop()


def test_an_unsigned_message_under_a_pinned_name_is_dropped_and_told_once_a_minute(keys):
    _, _, sign_a, _ = keys
    r = secure_relay()
    r.datagram_received(encode(chat(sign_a)), NEIGHBOUR, 0.0, WALL)  # pins alice
    forged = Message("f1", WALL, 5, "CHAT", ALICE, "", "FORGED", {"nick": "bob"})
    out = r.datagram_received(encode(forged), NEIGHBOUR, 0.1, WALL)
    assert not any(isinstance(a, Display) for a in out)
    assert any(isinstance(a, Notice) and ALICE in a.text for a in out)
    assert r.stats()["dropped_impostor"] == 1
    out = r.datagram_received(encode(forged._replace(mid="f2")), NEIGHBOUR, 0.2, WALL)
    assert out == [] and r.stats()["dropped_impostor"] == 2  # told once, counted each time
    # Not pinned (a seed-design node): shown, marked unverified.
    seed = Message("s1", WALL, 5, "CHAT", "127.0.0.1:9009", "", "plain", {})
    [shown] = [a for a in r.datagram_received(encode(seed), NEIGHBOUR, 0.3, WALL) if isinstance(a, Display)]
    assert shown.verified is False


def test_two_keys_offered_for_one_name_are_never_pinned_by_default(keys):
    a, b, sign_a, sign_b = keys
    c = crypto.Identity(bytes([3]) * 32)
    sign_c = signer(c.key_text, c.sign)
    t = new_trust()
    t.check(chat(sign_a), 0.0)
    assert t.check(chat(sign_b, mid="m2"), 1.0)[0] == KEY_CHANGED  # the owner's new key, say
    _, told = t.check(chat(sign_c, mid="m3"), 2.0)  # and an impostor's
    assert "2 keys offered" in told[0] and "FINGERPRINT" in told[0]
    pin, text = t.accept(ALICE)
    assert pin is None and b.fingerprint in text and c.fingerprint in text
    assert t.accept(ALICE, "ffff ffff")[0] is None
    pin, text = t.accept(ALICE, b.fingerprint[:9])
    assert pin == PinKey(ALICE, b.key_text)
    assert t.check(chat(sign_b, mid="m4"), 3.0)[0] == VERIFIED


def test_an_unverified_message_does_not_rename_its_sender_where_signatures_are_checked(keys):
    from meshchat.membership import Membership

    _, _, sign_a, _ = keys
    m = Membership(MembershipConfig(label=ME), [NEIGHBOUR], secret=b"k")
    r = Relay(RelayConfig(ME), peers=[NEIGHBOUR], trust=new_trust(), membership=m)
    r.datagram_received(encode(chat(sign_a)._replace(extra={})), NEIGHBOUR, 0.0, WALL)  # unsigned: not pinned
    stranger = Message("x1", WALL, 5, "CHAT", "127.0.0.1:9010", "", "hi", {"nick": "carol"})
    r.datagram_received(encode(stranger), NEIGHBOUR, 0.1, WALL)
    assert m.members["127.0.0.1:9010"].nick == ""  # not "carol": /who and @carol are not confused by it
    signed = sign_a(Message("m9", WALL, 5, "CHAT", ALICE, "", "hi", {"nick": "alice"}))
    r.datagram_received(encode(signed), NEIGHBOUR, 0.2, WALL)
    assert m.members[ALICE].nick == "alice"


def test_an_old_unsigned_copy_served_by_repair_under_a_pinned_name_is_dropped_without_a_notice(keys):
    _, _, sign_a, _ = keys
    r = secure_relay()
    r.datagram_received(encode(chat(sign_a)), NEIGHBOUR, 0.0, WALL)  # pins alice
    r.delivery = type("Late", (), {"is_late": staticmethod(lambda mid, ts, now: True)})()  # asked for: repair
    old = Message("o1", WALL - 3600, 1, "CHAT", ALICE, "", "from before her key", {})
    out = r._received(encode(old), NEIGHBOUR, 1.0, WALL)
    assert out == [] and r.stats()["dropped_impostor"] == 1  # dropped, and no notice of a forgery
