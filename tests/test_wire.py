import json

import pytest

from meshchat.wire import Message, WireError, decode, encode, format_addr, parse_addr

GOOD = {"mid": "abc", "ts": 1730563200.123, "ttl": 8, "kind": "CHAT",
        "src": "127.0.0.1:9001", "dst": "", "body": "hello mesh"}


def raw(**changes):
    obj = dict(GOOD, **changes)
    return json.dumps(obj, separators=(",", ":")).encode()


def test_round_trip_keeps_every_field():
    msg = Message("id-1", 1730563200.5, 3, "CHAT", "10.0.0.1:9001", "10.0.0.2:9002", "héllo ☃ 𝄞")
    assert decode(encode(msg)) == msg


def test_encoding_is_compact_json_in_seed_field_order():
    data = encode(Message("m", 1.5, 8, "CHAT", "127.0.0.1:9001", "", "hi"))
    assert data == b'{"mid":"m","ts":1.5,"ttl":8,"kind":"CHAT","src":"127.0.0.1:9001","dst":"","body":"hi"}'


def test_seed_datagram_decodes():
    msg = decode(raw())
    assert (msg.mid, msg.ttl, msg.kind, msg.src, msg.dst, msg.body) == (
        "abc", 8, "CHAT", "127.0.0.1:9001", "", "hello mesh")
    assert msg.is_broadcast


def test_unknown_fields_survive_a_round_trip_unchanged():
    msg = decode(raw(sig="xyz", hops=[1, {"a": None}]))
    assert msg.extra == {"sig": "xyz", "hops": [1, {"a": None}]}
    again = json.loads(encode(msg._replace(ttl=7)))
    assert again["sig"] == "xyz" and again["hops"] == [1, {"a": None}] and again["ttl"] == 7


def test_integer_ts_is_accepted():
    assert decode(raw(ts=1730563200)).ts == 1730563200.0


def test_whitespace_around_and_inside_the_object_is_accepted():
    spaced = json.dumps(json.loads(raw()), indent=1).encode()
    assert decode(b" \n" + spaced + b"\r\n\t ") == decode(raw())


def test_unknown_upper_case_kind_is_valid():
    assert decode(raw(kind="FILE_CHUNK")).kind == "FILE_CHUNK"


@pytest.mark.parametrize("data, why", [
    (b"\xff\xfe", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"text"', "not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    (raw() + b"{}", "not JSON"),  # extra data after the object
    (raw() + b" x", "not JSON"),
    (b"", "not JSON"),
])
def test_undecodable_datagrams_say_why(data, why):
    with pytest.raises(WireError, match=why):
        decode(data)


@pytest.mark.parametrize("field, value, why", [
    ("mid", "", "mid"),
    ("mid", 7, "mid"),
    ("mid", "x" * 65, "mid"),
    ("mid", "a\nb", "mid"),
    ("ts", "now", "ts"),
    ("ts", True, "ts"),
    ("ts", 10 ** 400, "ts"),
    ("ttl", 1.5, "ttl"),
    ("ttl", True, "ttl"),
    ("ttl", "8", "ttl"),
    ("kind", "chat", "kind"),
    ("kind", "A" * 17, "kind"),
    ("kind", None, "kind"),
    ("src", "nowhere", "nowhere"),
    ("src", "host:0", "port"),
    ("src", "host:99999", "port"),
    ("src", "bad host:1", "host"),
    ("dst", "x", "HOST:PORT"),
    ("dst", 5, "dst"),
    ("body", None, "body"),
    ("body", ["a"], "body"),
])
def test_each_bad_field_is_named(field, value, why):
    with pytest.raises(WireError, match=why):
        decode(raw(**{field: value}))


@pytest.mark.parametrize("field", ["mid", "ts", "ttl", "kind", "src", "dst", "body"])
def test_missing_field_is_named(field):
    obj = dict(GOOD)
    del obj[field]
    with pytest.raises(WireError, match=f"missing field '{field}'"):
        decode(json.dumps(obj).encode())


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_rejected(constant):
    with pytest.raises(WireError):
        decode(raw().replace(b"1730563200.123", constant))


def test_huge_float_literal_is_rejected():
    with pytest.raises(WireError, match="ts"):
        decode(raw().replace(b"1730563200.123", b"1e999"))


@pytest.mark.parametrize("escape", [b"\\ud800", b"\\uDFFF", b"x\\udc00y", b"\\ude00\\ud83d"])
def test_lone_surrogate_in_body_is_malformed(escape):
    with pytest.raises(WireError, match="body has a lone surrogate"):
        decode(raw().replace(b"hello mesh", escape))


def test_a_surrogate_pair_is_one_character_and_valid():
    assert decode(raw().replace(b"hello mesh", b"\\ud83d\\ude00")).body == "\U0001f600"


def _with_extra(value: bytes, key: bytes = b"x") -> bytes:
    return raw()[:-1] + b',"' + key + b'":' + value + b"}"


def _nest(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("value, why", [
    (b"1e999", "out of range"),
    (b"-1e999", "out of range"),
    (b"[1, {\"a\": 1e400}]", "out of range"),
    (b'"\\ud800"', "surrogate"),
    (b'{"k": ["\\udfff"]}', "surrogate"),
    (b'{"\\ud800": 1}', "surrogate"),
    (_nest(32), "nested over 32"),
    (_nest(900), "nested over 32"),
    (b"9" * 31, "digits"),
])
def test_unknown_fields_that_could_not_be_encoded_again_are_malformed(value, why):
    with pytest.raises(WireError, match=why):
        decode(_with_extra(value))


def test_a_lone_surrogate_in_an_unknown_key_is_malformed():
    with pytest.raises(WireError, match="surrogate"):
        decode(_with_extra(b"1", key=b"\\ud800"))


def test_nesting_up_to_32_levels_counting_the_message_is_valid():
    msg = decode(_with_extra(_nest(31)))
    assert decode(encode(msg)) == msg


def test_encode_raises_only_wire_error():
    for extra in ({"x": float("inf")}, {"x": object()}, {"x": {1j: 2}}):
        with pytest.raises(WireError, match="cannot encode"):
            encode(Message("m", 1.0, 1, "CHAT", "h:1", "", "b", extra))
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(WireError, match="cannot encode"):
        encode(Message("m", 1.0, 1, "CHAT", "h:1", "", "b", {"x": deep}))


@pytest.mark.parametrize("text, addr", [("127.0.0.1:9001", ("127.0.0.1", 9001)),
                                        ("localhost:1", ("localhost", 1)),
                                        ("my-host.lan:65535", ("my-host.lan", 65535))])
def test_parse_addr(text, addr):
    assert parse_addr(text) == addr
    assert format_addr(addr) == text


@pytest.mark.parametrize("text", ["9001", ":9001", "host:", "host:abc", "host:-1", "host:65536",
                                  "ho st:1", "host:１２", "a" * 300 + ":1", "host:000001", "host:" + "1" * 5000,
                                  "host:" + "0" * 4999 + "1", "host:\ud800"])
def test_parse_addr_rejects(text):
    with pytest.raises(WireError) as e:
        parse_addr(text)
    assert len(str(e.value)) < 150


def test_ports_of_five_digits_with_leading_zeros_are_accepted():
    assert parse_addr("host:09001") == ("host", 9001)


@pytest.mark.parametrize("field", ["src", "dst"])
def test_a_port_of_5000_digits_is_malformed_not_a_crash(field):
    # int() raises ValueError on more than 4,300 digits (Python 3.11+): it must never be reached.
    with pytest.raises(WireError, match="port"):
        decode(raw(**{field: "127.0.0.1:" + "1" * 5000}))


@pytest.mark.parametrize("field", [b'"ttl":8', b'"ts":1730563200.123'])
def test_integers_of_thousands_of_digits_are_rejected(field):
    name = field.split(b":")[0]
    with pytest.raises(WireError, match="digits"):
        decode(raw().replace(field, name + b":" + b"9" * 5000))
