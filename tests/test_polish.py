"""Small things a fresh-clone review found: /trace of this node's own name, a neighbour that says
goodbye keeps its nick, an identity file others can read is warned about, and the missing-extra
line names both ways to install it."""

import io
import json
import os
import subprocess
import sys

import pytest

from meshchat import crypto
from meshchat.cli import run_command
from meshchat.console import JsonConsole
from meshchat.commands import parse_line
from meshchat.membership import Membership, MembershipConfig, PeerDown, PeerUp, display_name

from nodes import Probe

ME = "10.0.0.1:9000"


def test_our_own_nick_resolves_to_a_clear_refusal_not_an_unknown_node():
    m = Membership(MembershipConfig(label=ME, nick="ann"), secret=b"k")
    assert m.resolve("ann") == (None, "that is this node")
    assert m.resolve("ANN#" + display_name(ME, "ann").split("#")[1].upper()) == (None, "that is this node")
    assert "no node called 'ann#zzzz'" in m.resolve("ann#zzzz")[1], "another tag is another node"
    assert "no node called 'bob'" in m.resolve("bob")[1]


def _nicked(nick: str) -> Probe:
    return Probe(membership=MembershipConfig(label="", hello_max_s=0.4, nick=nick))


def test_trace_of_this_nodes_own_nick_or_label_says_that_is_this_node():
    ann = _nicked("ann")
    try:
        ann.node.start()
        out = io.StringIO()
        con = JsonConsole(out)
        for line in ("/trace ann", f"/trace {display_name(ann.label, 'ann')}", f"/trace {ann.label}"):
            assert run_command(parse_line(line), ann.node, con)
        errors = [json.loads(x)["error"] for x in out.getvalue().splitlines()]
        assert errors == ["cannot trace ann: that is this node",
                          f"cannot trace {display_name(ann.label, 'ann')}: that is this node",
                          f"cannot trace {ann.label}: that is this node"]
    finally:
        ann.node.stop()


def test_a_neighbour_that_says_goodbye_is_down_under_its_nick_and_peers_keep_it():
    ann, bob = _nicked("ann"), _nicked("bob")
    try:
        ann.node.add_peer(bob.node.addr)
        bob.node.add_peer(ann.node.addr)
        ann.node.start()
        bob.node.start()
        up = ann.next(PeerUp)
        while not up.nick:  # the first may come before its nick did (a bare challenge)
            up = ann.next(PeerUp)
        assert up.nick == "bob"
        bob.node.stop()  # a clean stop: a goodbye HELLO, which carries no nick
        down = ann.next(PeerDown, timeout=10)
        assert (down.label, down.nick) == (bob.label, "bob")
        [row] = ann.node.neighbour_rows()
        assert (row["state"], row["nick"]) == ("down", "bob")
    finally:
        bob.node.stop()
        ann.node.stop()


def _start_with_key(path, mode):
    os.chmod(path, mode)
    return subprocess.run([sys.executable, "-m", "meshchat", "--identity", str(path), "--no-discover", "--no-history",
                           "--port", "0", "--json", "--peers", "127.0.0.1:9"],
                          capture_output=True, text=True, timeout=30, input="")


@pytest.mark.skipif(not crypto.available() or os.name != "posix", reason="POSIX modes, and the secure extra")
def test_an_identity_file_others_can_read_is_warned_about_once_at_start(tmp_path):
    key = tmp_path / "id.key"
    crypto.Identity.load_or_create(key)
    assert crypto.exposed_warning(key) == "", "made 0600"
    loose = _start_with_key(key, 0o644)
    assert loose.returncode == 0, loose.stderr
    assert loose.stderr.count("\n") == 1 and "Traceback" not in loose.stderr
    assert loose.stderr.startswith(f"meshchat: warning: identity file {key} is readable or writable by others "
                                   "(mode 0644)") and f"chmod 600 {key}" in loose.stderr
    assert json.loads(loose.stdout.splitlines()[0])["event"] == "ready", "a warning, not a refusal"
    tight = _start_with_key(key, 0o600)
    assert tight.returncode == 0 and tight.stderr == ""


def test_the_missing_extra_line_names_the_package_and_the_clone(monkeypatch):
    monkeypatch.setattr(crypto, "_MISSING", "the 'cryptography' package is not installed")
    with pytest.raises(crypto.CryptoUnavailable) as e:
        crypto.require("--identity")
    text = str(e.value)
    assert "\n" not in text
    assert "pip install 'meshchat[secure]'" in text and "from a clone: pip install '.[secure]'" in text
