"""Closed meshes: datagrams sealed under a network key (crypto.py "Sealed datagrams", the relay's
unseal at its entry, the node's sealing once per Send, the CLI's key options)."""

import json
import os
import queue
import socket
import subprocess
import sys
import time

import pytest

from meshchat import cli, crypto
from meshchat.node import Node
from meshchat.relay import Display, Relay, RelayConfig, Send
from meshchat.wire import Message, decode, encode

from meshsim import addr_of, label_of
from procs import Proc, run

pytestmark = pytest.mark.skipif(not crypto.available(), reason="needs the secure extra")

WALL = 1_000_000.0
TIMEOUT_S = 5.0


def _key(seed: int) -> crypto.NetworkKey:
    return crypto.NetworkKey(bytes([seed]) * crypto.NETWORK_KEY_BYTES)


def _chat(mid: str = "m1", body: str = "secret words", dst: str = "", ttl: int = 4) -> bytes:
    return encode(Message(mid, WALL, ttl, "CHAT", label_of(2), dst, body))


def _adds_up(r: Relay) -> bool:
    s = r.stats()
    return s["handled"] + sum(v for k, v in s.items() if k.startswith("dropped_")) == s["received"]


# -- the format ----------------------------------------------------------------------------------

def test_a_sealed_datagram_opens_under_its_key_only_and_hides_its_content():
    key, other = _key(1), _key(2)
    plain = _chat()
    sealed = crypto.seal(key, plain)
    assert crypto.unseal(key, sealed) == plain
    assert sealed.startswith(crypto.SEAL_MAGIC) and not sealed.startswith(b"{")
    assert len(sealed) == len(plain) + crypto.SEAL_OVERHEAD_BYTES
    assert b"secret" not in sealed and b"mid" not in sealed
    assert crypto.seal(key, plain) != sealed  # a fresh nonce each time
    assert crypto.unseal(other, sealed) is None
    assert crypto.unseal(key, plain) is None


def test_every_truncation_and_every_bit_flip_of_a_sealed_datagram_fails_cleanly():
    key = _key(1)
    sealed = crypto.seal(key, _chat())
    for n in range(len(sealed)):
        assert crypto.unseal(key, sealed[:n]) is None
    for i in range(len(sealed)):
        for bit in (0x01, 0x80):
            flipped = bytearray(sealed)
            flipped[i] ^= bit
            assert crypto.unseal(key, bytes(flipped)) is None, (i, bit)
    assert crypto.unseal(key, sealed + b"\0") is None


def test_the_aead_key_is_derived_never_the_file_key_itself():
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    raw = bytes(range(32))
    sealed = crypto.seal(crypto.NetworkKey(raw), b"{}")
    header = sealed[:crypto.SEAL_HEADER_BYTES]
    with pytest.raises(Exception):
        ChaCha20Poly1305(raw).decrypt(header[-crypto.SEAL_NONCE_BYTES:], sealed[crypto.SEAL_HEADER_BYTES:], header)


def test_key_files_round_trip_and_malformed_ones_say_why(tmp_path):
    raw = crypto.new_network_key()
    assert crypto.parse_network_key(crypto.format_network_key(raw)) == raw
    for text, why in (("", "one base64 line"), ("# only a comment\n", "one base64 line"), ("a\nb\n", "one base64"),
                      ("not base64!\n", "not base64"), ("aGk=\n", "2 bytes, not 32")):
        with pytest.raises(crypto.NetworkKeyError, match=why):
            crypto.parse_network_key(text)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" * 10)
    big = tmp_path / "big"
    big.write_bytes(b"#" * 10_000)
    for path, why in ((tmp_path / "missing", "cannot read"), (binary, "not text"), (big, "too big"),
                      (tmp_path, "cannot read")):
        with pytest.raises(crypto.NetworkKeyError, match=why) as e:
            crypto.load_network_key(str(path))
        assert "\n" not in str(e.value)


# -- the relay: opened first thing, counted once ----------------------------------------------

def _relay(key=None, optional=False, **config) -> Relay:
    unseal = crypto.opener(key, optional) if key is not None else None
    return Relay(RelayConfig(label=label_of(1), **config), [addr_of(2), addr_of(3)], unseal=unseal)


def test_a_keyed_relay_takes_sealed_datagrams_and_relays_them_in_plaintext_for_the_node_to_seal():
    key = _key(1)
    r = _relay(key)
    actions = r.datagram_received(crypto.seal(key, _chat()), addr_of(2), 1.0, WALL)
    [shown] = [a for a in actions if type(a) is Display]
    assert shown.message.body == "secret words" and shown.sealed is True
    [copy] = [a for a in actions if type(a) is Send]
    assert decode(copy.data).ttl == 3 and copy.addrs == (addr_of(3),)  # the node seals it once per Send
    assert r.counters.dropped_unauthenticated == 0 and _adds_up(r)


def test_outsiders_datagrams_are_dropped_before_any_other_work_and_counted_once():
    key = _key(1)
    r = _relay(key, rate_limit=1.0)
    good = crypto.seal(key, _chat("mg"))
    outsiders = [_chat("m1"), crypto.seal(_key(2), _chat("m2")), good[:-1], good[:10], b"",
                 good[:30] + bytes([good[30] ^ 1]) + good[31:], crypto.SEAL_MAGIC + b"x" * 100]
    for i, data in enumerate(outsiders * 20):
        assert r.datagram_received(data, ("10.9.%d.%d" % (i >> 8, i & 255), 9000), 1.0, WALL) == []
    c = r.counters
    assert c.received == c.dropped_unauthenticated == len(outsiders) * 20
    # Nothing grew and nothing was drawn on: no stranger seen, no bucket (rate 1/s is not spent).
    assert r.heard == {} and r._buckets == {} and len(r.seen) == 0 and c.dropped_rate == 0
    assert any(type(a) is Display for a in r.datagram_received(good, addr_of(2), 1.0, WALL))
    assert _adds_up(r)


def test_a_replayed_sealed_datagram_is_not_shown_twice_even_sealed_again():
    key = _key(1)
    r = _relay(key)
    sealed = crypto.seal(key, _chat())
    first = r.datagram_received(sealed, addr_of(2), 1.0, WALL)
    assert [a for a in first if type(a) is Display]
    assert r.datagram_received(sealed, addr_of(2), 2.0, WALL) == []
    assert r.datagram_received(crypto.seal(key, _chat()), addr_of(3), 3.0, WALL) == []
    assert r.counters.displayed == 1 and r.counters.dropped_duplicate == 2 and _adds_up(r)


def test_optional_takes_plaintext_marked_counted_and_answers_or_relays_none_of_it():
    key = _key(1)
    strict, optional = _relay(key), _relay(key, optional=True)
    ping = encode(Message("p1", WALL, 4, "PING", label_of(2), "", ""))
    assert strict.datagram_received(_chat(), addr_of(2), 1.0, WALL) == []
    assert strict.counters.dropped_unauthenticated == 1
    actions = optional.datagram_received(_chat(), addr_of(2), 1.0, WALL)
    assert [type(a) for a in actions] == [Display] and actions[0].sealed is False
    assert optional.datagram_received(ping, addr_of(2), 1.0, WALL) == []  # no PONG, no copy
    c = optional.counters
    assert c.received_plaintext == 2 and c.plaintext_withheld == 3 and c.sent == 0
    # A datagram that claims a seal it does not have is never taken for plaintext.
    assert optional.datagram_received(crypto.seal(_key(2), _chat("m9")), addr_of(2), 1.0, WALL) == []
    assert c.dropped_unauthenticated == 1 and _adds_up(optional)
    # Sealed ones still go on as usual.
    sealed = optional.datagram_received(crypto.seal(key, _chat("m2")), addr_of(2), 1.0, WALL)
    assert {type(a) for a in sealed} == {Display, Send}


def test_a_relay_without_a_key_is_unchanged():
    r = _relay()
    assert [a for a in r.datagram_received(_chat(), addr_of(2), 1.0, WALL) if type(a) is Display]
    assert r.counters.dropped_malformed == 0
    assert r.datagram_received(crypto.seal(_key(1), _chat("m2")), addr_of(2), 1.0, WALL) == []
    assert r.counters.dropped_malformed == 1  # a sealed datagram is garbage to a node without the key


# -- real nodes on loopback ---------------------------------------------------------------------

class _Traced:
    """A node whose events and processed datagrams are queued, so tests wait instead of sleeping."""

    def __init__(self, key=None, optional=False, peers=(), membership=None, discovery=None):
        self.events: "queue.Queue[object]" = queue.Queue()
        self.processed: "queue.Queue[int]" = queue.Queue()
        processed = self.processed

        class Traced(Relay):
            def datagram_received(self, *args):
                try:
                    return super().datagram_received(*args)
                finally:
                    processed.put(1)

        self.node = Node(RelayConfig(label=""), peers=peers, on_event=self.events.put, relay_factory=Traced,
                         membership=membership, discovery=discovery, network_key=key, network_key_optional=optional)

    def next(self, kind):
        deadline = time.monotonic() + TIMEOUT_S * 2
        while True:
            event = self.events.get(timeout=max(deadline - time.monotonic(), 0.001))
            if isinstance(event, kind):
                return event

    def wait(self, condition) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            try:
                self.processed.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError("condition not met in time") from None

    def shown(self):
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            event = self.events.get(timeout=max(deadline - time.monotonic(), 0.001))
            if isinstance(event, Display):
                return event

    def displays(self):
        out = []
        while not self.events.empty():
            event = self.events.get_nowait()
            if isinstance(event, Display):
                out.append(event)
        return out


def _udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(TIMEOUT_S)
    return s


def test_two_keyed_nodes_chat_and_an_outsider_reads_nothing_and_injects_nothing():
    key = _key(7)
    with _udp() as outsider:
        a = _Traced(key, peers=[outsider.getsockname()])
        b = _Traced(key)
        c = _Traced(peers=[b.node.addr])  # no key
        try:
            a.node.add_peer(b.node.addr)
            for t in (a, b, c):
                t.node.start()
            a.node.say("meet at the old mill")
            assert b.shown().message.body == "meet at the old mill"
            data, _ = outsider.recvfrom(65535)
            assert data.startswith(crypto.SEAL_MAGIC) and b"old mill" not in data and b"CHAT" not in data
            c.node.say("I am b's friend, trust me")
            outsider.sendto(encode(Message("x1", time.time(), 4, "CHAT", "1.2.3.4:5", "", "forged")), b.node.addr)
            b.wait(lambda: b.node.stats()["dropped_unauthenticated"] >= 2)
            # The replay of a captured sealed datagram is not shown again either.
            outsider.sendto(data, b.node.addr)
            b.wait(lambda: b.node.stats()["dropped_duplicate"] >= 1)
            assert b.displays() == []
            s = b.node.stats()
            assert s["received"] == s["handled"] + sum(v for k, v in s.items() if k.startswith("dropped_"))
        finally:
            for t in (a, b, c):
                t.node.stop()


def test_keyed_nodes_find_each_other_by_sealed_beacons_and_hellos_and_a_keyless_one_stays_out():
    from meshchat.membership import MembershipConfig, PeerUp

    from test_membership_live import group

    fast, disc = MembershipConfig(label="", hello_max_s=0.4), group(11)
    nodes = [_Traced(_key(3), membership=fast, discovery=disc) for _ in range(2)]
    nodes.append(_Traced(membership=fast, discovery=disc))  # same group, same mesh name, no key
    try:
        for t in nodes:
            t.node.start()
        a, b, outsider = nodes
        assert a.next(PeerUp).label == b.node.label and b.next(PeerUp).label == a.node.label
        a.node.say("only for us")
        assert b.shown().message.body == "only for us"
        a.wait(lambda: a.node.stats()["dropped_unauthenticated"] >= 1)  # the outsider's beacons
        outsider.wait(lambda: outsider.node.stats()["dropped_malformed"] >= 2)  # ours, unreadable to it
        assert outsider.node.neighbour_rows() == [] and len(a.node.neighbour_rows()) == 1
        assert not [e for e in outsider.displays() if "only" in e.message.body]
    finally:
        for t in nodes:
            t.node.stop()


def test_an_optional_node_shows_a_keyless_nodes_chat_as_not_sealed():
    b = _Traced(_key(7), optional=True)
    c = _Traced(peers=[b.node.addr])
    try:
        b.node.start()
        c.node.start()
        c.node.say("hello from outside")
        shown = b.shown()
        assert shown.message.body == "hello from outside" and shown.sealed is False
        assert b.node.stats()["received_plaintext"] == 1
    finally:
        b.node.stop()
        c.node.stop()


# -- the command line ---------------------------------------------------------------------------

def test_new_network_key_writes_a_usable_private_key_and_never_overwrites(tmp_path):
    path = tmp_path / "mesh.key"
    made = run("--new-network-key", str(path))
    assert made.returncode == 0 and made.stdout.count("\n") == 1 and str(path) in made.stdout
    text = path.read_text()
    assert text.startswith("#") and crypto.parse_network_key(text)
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600
    again = run("--new-network-key", str(path))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    assert path.read_text() == text
    assert isinstance(cli.parse_args(["--network-key", str(path)]).network_key, crypto.NetworkKey)


@pytest.mark.parametrize("content, why", [(b"junk\n", "not a meshchat network key"), (None, "cannot read")])
def test_a_bad_network_key_file_exits_2_with_one_line(tmp_path, capsys, content, why):
    path = tmp_path / "k"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--network-key", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and why in err and str(path) in err


def test_network_key_optional_alone_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--network-key-optional"])
    assert e.value.code == 2 and "needs --network-key" in capsys.readouterr().err


def test_without_the_extra_key_options_exit_2_with_the_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(crypto, "_MISSING", "the 'cryptography' package is not installed")
    path = tmp_path / "k"
    for argv in (["--network-key", str(path)], ["--new-network-key", str(path)]):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "pip install 'meshchat[secure]'" in err
    assert not path.exists()


def test_the_base_install_runs_as_today_and_key_options_say_which_extra(tmp_path):
    """A child whose sitecustomize makes ``import cryptography`` fail, as on a base install."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoCrypto:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cryptography' or name.startswith('cryptography.'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, _NoCrypto())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))

    def meshchat(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "meshchat", "--no-discover", "--no-history", *args],
                              input=stdin, capture_output=True, text=True, timeout=30, env=env)

    plain = meshchat("--port", "0", "--json", "--peers", "127.0.0.1:9")
    assert plain.returncode == 0 and json.loads(plain.stdout.splitlines()[0])["event"] == "ready"
    assert plain.stderr == ""
    for option in ("--network-key", "--new-network-key"):
        result = meshchat(option, str(tmp_path / "k"))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"{option} needs the secure extra: pip install 'meshchat[secure]'" in result.stderr
    assert not (tmp_path / "k").exists()


def test_two_processes_with_one_key_chat_and_their_events_say_sealed(tmp_path):
    path = str(tmp_path / "mesh.key")
    assert run("--new-network-key", path).returncode == 0
    with Proc("--port", "0", "--json", "--headless", "--network-key", path) as listener:
        port = listener.ready().rsplit(":", 1)[1]
        with Proc("--port", "0", "--json", "--network-key", path, "--peers", f"127.0.0.1:{port}") as sender:
            sender.ready()
            sender.send("sealed hello")
            chat = listener.event("chat")
            assert chat["body"] == "sealed hello" and chat["sealed"] is True


def test_consoles_mark_a_message_that_came_unsealed():
    import io

    from meshchat.console import JsonConsole, TerminalConsole

    msg = decode(_chat())
    out = io.StringIO()
    TerminalConsole(out, color=False, interactive=False).show(Display(msg, sealed=False))
    TerminalConsole(out, color=False, interactive=False).show(Display(msg, sealed=True))
    first, second = out.getvalue().splitlines()
    assert "(not sealed)" in first and "secret words" in first and "sealed" not in second
    out = io.StringIO()
    console = JsonConsole(out)
    for sealed in (False, True, None):
        console.show(Display(msg, sealed=sealed))
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e.get("sealed", "absent") for e in events] == [False, True, "absent"]
