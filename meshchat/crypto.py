"""Cryptography: identity, signatures, sealed datagrams, end-to-end boxes.

The only module that imports ``cryptography`` (an optional extra:
``pip install 'meshchat[secure]'``). Without it the rest of meshchat works as
before; ``available()`` says whether it is there, and ``require(option)``
gives the one-line error an option that needs keys exits with. Nothing here
is a construction of our own: Ed25519, X25519, HKDF-SHA256 and
ChaCha20-Poly1305 are used as the library provides them.
"""

import base64
import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

try:  # the optional extra
    import cryptography  # noqa: F401
except ImportError:  # pragma: no cover - depends on the install
    _MISSING: Optional[str] = "the 'cryptography' package is not installed"
else:
    _MISSING = None

EXTRA = "meshchat[secure]"
# People with a clone install the extra from it (the README says so): the line names both ways.
INSTALL_HINT = f"pip install '{EXTRA}' (from a clone: pip install '.[secure]')"


class CryptoUnavailable(RuntimeError):
    """An option needs keys and the optional extra is not installed."""


def available() -> bool:
    return _MISSING is None


def require(option: str) -> None:
    """Raise CryptoUnavailable with the one line the user sees if the extra is missing."""
    if _MISSING is not None:
        raise CryptoUnavailable(f"{option} needs the secure extra: {INSTALL_HINT}; {_MISSING}")


# -- Identity and signatures ----------------------------------------------------------------------
#
# A node's identity is one Ed25519 key pair. The private key is kept as the 32-byte
# raw seed in a file of its own (PEM would add nothing: nothing else reads it).
# Keys and signatures travel as urlsafe base64 without padding.


IDENTITY_NAME = "identity.key"
KEY_CHARS = 43  # 32 bytes in urlsafe base64 without padding
SIG_CHARS = 86  # 64 bytes
_SEED_BYTES = 32
_MAX_KEY_CACHE = 4096  # public keys parsed once and kept: verifying is per first copy, parsing is not free


class IdentityError(Exception):
    """The identity file cannot be read, written or used; the text is one line for the user."""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: object, size: int) -> Optional[bytes]:
    """``text`` decoded, if it is exactly ``size`` bytes in urlsafe base64 without padding; else None."""
    chars = (size * 4 + 2) // 3
    if type(text) is not str or len(text) != chars or not text.isascii():
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-chars % 4))
    except ValueError:
        return None
    # Reject non-canonical spellings (stray bits in the last character), so one key has one text.
    return data if len(data) == size and b64(data) == text else None


def fingerprint(public: bytes) -> str:
    """What people compare: 4 groups of 4 hex digits of SHA-256 of the public key."""
    h = hashlib.sha256(public).hexdigest()[:16]
    return " ".join(h[i:i + 4] for i in range(0, 16, 4))


class Identity:
    """An Ed25519 key pair: ``public`` (32 bytes), ``key_text`` (as it travels), ``fingerprint``."""

    def __init__(self, seed: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        self._seed = seed
        self.public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_text = b64(self.public)
        self.fingerprint = fingerprint(self.public)
        self.box = BoxKey.from_identity_seed(seed)  # end-to-end boxes (below): derived, never stored apart

    @classmethod
    def generate(cls) -> "Identity":
        require("an identity")
        return cls(os.urandom(_SEED_BYTES))

    @classmethod
    def load_or_create(cls, path: "os.PathLike[str] | str") -> "Tuple[Identity, bool]":
        """The identity in ``path``, made (mode 0600) if the file does not exist; (identity, created).

        A file that exists but cannot be read or is not a key is an IdentityError: never
        replaced, since that would silently give this node a new identity."""
        require("an identity")
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return cls._create(p), True
        except OSError as e:
            raise IdentityError(f"cannot read identity file {p}: {e.strerror or e}") from None
        seed = unb64(raw.strip().decode("ascii", "replace"), _SEED_BYTES)
        if seed is None:
            raise IdentityError(f"identity file {p} is not a meshchat key; move it away to make a new identity")
        return cls(seed), False

    @classmethod
    def _create(cls, p: Path) -> "Identity":
        ident = cls(os.urandom(_SEED_BYTES))
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: two processes starting at once never overwrite each other's key.
            fd = os.open(str(p), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            try:
                os.write(fd, (b64(ident._seed) + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            if os.name == "posix":
                os.chmod(str(p), 0o600)  # whatever the umask; elsewhere the folder's rights apply
        except FileExistsError:
            return cls.load_or_create(p)[0]
        except OSError as e:
            raise IdentityError(f"cannot write identity file {p}: {e.strerror or e}") from None
        return ident

    def sign(self, data: bytes) -> str:
        return b64(self._private.sign(data))


def exposed_warning(path: "os.PathLike[str] | str") -> str:
    """One line if the key file at ``path`` can be read or changed by others (POSIX modes), else "".

    Only a warning: the key still works, and refusing it would stop a node over a chmod; but anyone
    who can read it can sign as this node, so the user is told once, at start."""
    if os.name != "posix":
        return ""  # on Windows the folder's rights apply; modes say nothing there
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if not mode & 0o077:
        return ""
    return (f"identity file {path} is readable or writable by others (mode {mode & 0o777:04o}): "
            f"anyone who can read it can sign as this node and open its private messages; chmod 600 {path}")


_key_cache: "Dict[bytes, Any]" = {}


def verify(public: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``data``. Never raises."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = _key_cache.get(public)
    if key is None:
        try:
            key = Ed25519PublicKey.from_public_bytes(public)
        except ValueError:
            return False
        if len(_key_cache) >= _MAX_KEY_CACHE:
            _key_cache.clear()
        _key_cache[public] = key
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


# -- Sealed datagrams ------------------------------------------------------------------------
#
# A closed mesh shares one network key (a file of 32 random bytes). Every datagram a node
# with the key sends is sealed whole:
#
#     MAGIC (4 bytes, "MCS1": format version 1) | key id (4) | nonce (12) | ChaCha20-Poly1305(json) + tag (16)
#
# The header is the AEAD's associated data, so nothing in it can be changed either. The
# magic never starts with "{", so a sealed datagram is told apart from plaintext JSON before
# any parsing. The key id (derived, not the key) lets a datagram sealed under another key be
# refused without trying to open it. The AEAD key and the key id are both derived from the
# file's key with HKDF-SHA256 under their own labels; the file's key is never used raw. The
# nonce is random per datagram: 96 bits make a repeat unlikely over billions of datagrams.


SEAL_MAGIC = b"MCS1"
SEAL_KEY_ID_BYTES = 4
SEAL_NONCE_BYTES = 12
SEAL_TAG_BYTES = 16
SEAL_HEADER_BYTES = len(SEAL_MAGIC) + SEAL_KEY_ID_BYTES + SEAL_NONCE_BYTES
SEAL_OVERHEAD_BYTES = SEAL_HEADER_BYTES + SEAL_TAG_BYTES
NETWORK_KEY_BYTES = 32
NETWORK_KEY_HEADER = "# meshchat network key: anyone holding this file can read and write in the mesh; keep it secret"
_AEAD_INFO = b"meshchat/seal/v1/aead-key"
_KEY_ID_INFO = b"meshchat/seal/v1/key-id"
_MAX_KEY_FILE_BYTES = 4096  # a key file is two short lines; anything bigger is not one


class NetworkKeyError(ValueError):
    """A network key file that cannot be used; the message is the one line the user sees."""


class NetworkKey:
    """A network key, derived once: what seal() and unseal() need (the raw key is not kept)."""

    __slots__ = ("key_id", "_aead", "_prefix")

    def __init__(self, raw: bytes) -> None:
        require("--network-key")
        if len(raw) != NETWORK_KEY_BYTES:
            raise NetworkKeyError(f"a network key is {NETWORK_KEY_BYTES} bytes, not {len(raw)}")
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self.key_id = _hkdf(raw, None, _KEY_ID_INFO, SEAL_KEY_ID_BYTES)
        self._aead = ChaCha20Poly1305(_hkdf(raw, None, _AEAD_INFO, 32))
        self._prefix = SEAL_MAGIC + self.key_id


def seal(key: NetworkKey, plaintext: bytes) -> bytes:
    """``plaintext`` as a sealed datagram, under a fresh random nonce."""
    header = key._prefix + os.urandom(SEAL_NONCE_BYTES)
    return header + key._aead.encrypt(header[-SEAL_NONCE_BYTES:], plaintext, header)


def unseal(key: NetworkKey, datagram: bytes) -> Optional[bytes]:
    """The plaintext of a datagram sealed under ``key``; None for anything else (plaintext,
    another key, truncated, changed in any bit)."""
    if len(datagram) < SEAL_OVERHEAD_BYTES or not datagram.startswith(key._prefix):
        return None
    header = datagram[:SEAL_HEADER_BYTES]
    try:
        return key._aead.decrypt(header[-SEAL_NONCE_BYTES:], datagram[SEAL_HEADER_BYTES:], header)
    except Exception:  # cryptography's InvalidTag: forged, damaged, or sealed under another key
        return None


_JSON_SPACE = b" \t\r\n"


def opener(key: NetworkKey, optional: bool = False):
    """The relay's ``unseal``: a datagram to (plaintext, sealed) or None (an outsider's: drop it).

    With ``optional`` (--network-key-optional), a plaintext message (a JSON object, as nodes
    without the key send) is let in, marked as such; anything else, such as a datagram that
    claims a seal it does not have, never is."""
    def open_datagram(datagram: bytes) -> Optional[Tuple[bytes, bool]]:
        plain = unseal(key, datagram)
        if plain is not None:
            return plain, True
        if optional and datagram.lstrip(_JSON_SPACE)[:1] == b"{":
            return datagram, False
        return None

    return open_datagram


def new_network_key() -> bytes:
    return os.urandom(NETWORK_KEY_BYTES)


def format_network_key(raw: bytes) -> str:
    """The text of a key file: a comment line, then the key in base64 (so it can be copied)."""
    return f"{NETWORK_KEY_HEADER}\n{base64.b64encode(raw).decode('ascii')}\n"


def parse_network_key(text: str) -> bytes:
    """The key in a key file's text; NetworkKeyError saying what is wrong."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if len(lines) != 1:
        raise NetworkKeyError("not a meshchat network key (expected one base64 line; "
                              "make one with --new-network-key FILE)")
    try:
        raw = base64.b64decode(lines[0], validate=True)
    except (ValueError, TypeError):
        raise NetworkKeyError("not a meshchat network key (its key line is not base64)") from None
    if len(raw) != NETWORK_KEY_BYTES:
        raise NetworkKeyError(f"not a meshchat network key ({len(raw)} bytes, not {NETWORK_KEY_BYTES})")
    return raw


def write_network_key(path: str) -> None:
    """Write a fresh key to ``path``, readable by its owner only (POSIX); never over an existing
    file (FileExistsError). Created exclusively, so two writers cannot both think they made it."""
    require("--new-network-key")
    text = format_network_key(new_network_key()).encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)


def load_network_key(path: str) -> NetworkKey:
    """The key in the file at ``path``; NetworkKeyError (one line, naming the file) if unusable."""
    require("--network-key")
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise NetworkKeyError(f"cannot read network key file {path}: {e.strerror or e}") from None
    try:
        if len(data) > _MAX_KEY_FILE_BYTES:
            raise NetworkKeyError("not a meshchat network key (too big)")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise NetworkKeyError("not a meshchat network key (not text)") from None
        return NetworkKey(parse_network_key(text))
    except NetworkKeyError as e:
        raise NetworkKeyError(f"network key file {path}: {e}") from None


# -- End-to-end boxes ---------------------------------------------------------------------------
#
# A node's box key is an X25519 key pair derived from its identity seed with HKDF-SHA256 (info
# BOX_KEY_INFO, no salt): one file keeps both, and a restart keeps the same box key. Its public
# half travels in the node's signed PRESENCE and KEY answers (covered by the identity's
# signature), so it is bound to the identity.
#
# A box for one message: a fresh X25519 key pair per message (Reticulum's way; the sender keeps
# nothing), the shared secret with the recipient's box key through HKDF-SHA256 (salt: both public
# keys; info BOX_INFO) giving a 32-byte ChaCha20-Poly1305 key and its 12-byte nonce (the key is
# never used twice, so a derived nonce is safe, as in HPKE), and the header fields as associated
# data. The box is ephemeral public key (32 bytes) || ciphertext || tag (16 bytes).

BOX_KEY_INFO = b"meshchat x25519 box key v1"
BOX_INFO = b"meshchat box v1"
BOX_KEY_BYTES = 32
BOX_OVERHEAD_BYTES = 32 + 16  # ephemeral public key, Poly1305 tag


def _hkdf(secret: bytes, salt: Optional[bytes], info: bytes, size: int) -> bytes:
    """HKDF-SHA256: every key we use is derived under its own label, never used raw."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=size, salt=salt, info=info).derive(secret)


class BoxKey:
    """Our X25519 box key: ``public`` (32 bytes), ``key_text`` (as it travels); ``open`` a box to us."""

    def __init__(self, private_bytes: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._private = X25519PrivateKey.from_private_bytes(private_bytes)
        self.public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_text = b64(self.public)

    @classmethod
    def from_identity_seed(cls, seed: bytes) -> "BoxKey":
        return cls(_hkdf(seed, None, BOX_KEY_INFO, BOX_KEY_BYTES))

    def open(self, box: bytes, aad: bytes) -> Optional[bytes]:
        """The plaintext of ``box``, if it was sealed to us with ``aad``; else None. Never raises."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        if len(box) < BOX_OVERHEAD_BYTES:
            return None
        eph = box[:32]
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(eph))
        except ValueError:  # a low-order point: the shared secret would be all zeros
            return None
        okm = _hkdf(shared, eph + self.public, BOX_INFO, 44)
        try:
            return ChaCha20Poly1305(okm[:32]).decrypt(okm[32:], box[32:], aad)
        except InvalidTag:
            return None


def seal_to(their_public: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """A box only the holder of ``their_public``'s private key opens, bound to ``aad``."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    eph = X25519PrivateKey.generate()
    eph_public = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = eph.exchange(X25519PublicKey.from_public_bytes(their_public))
    okm = _hkdf(shared, eph_public + their_public, BOX_INFO, 44)
    return eph_public + ChaCha20Poly1305(okm[:32]).encrypt(okm[32:], plaintext, aad)


# -- End-to-end files ---------------------------------------------------------------------------
#
# A direct file (files.py, ``/send NAME PATH``) gets a fresh random 32-byte key; the key goes to the
# destination inside a box (seal_to above). Each chunk is ChaCha20-Poly1305 under that key with the
# piece's index as its 12-byte nonce (big-endian): safe because the key is never used for another
# file, and deterministic, so the sender encrypts a chunk again each time it serves it and the hash
# list over the ciphertext, computed once, stays right. The file's id is the associated data.

FILE_KEY_BYTES = 32
FILE_TAG_BYTES = 16


def new_file_key() -> bytes:
    return os.urandom(FILE_KEY_BYTES)


def _file_aead(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key)


def _chunk_nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


class FileCipher:
    """One file's chunk cipher: ``seal`` a plaintext chunk, ``open`` a ciphertext one (None if it
    does not open). The AEAD object is made once per file, not per chunk."""

    __slots__ = ("_aead", "_aad")

    def __init__(self, key: bytes, fid: str) -> None:
        require("end-to-end files")
        if len(key) != FILE_KEY_BYTES:
            raise ValueError(f"a file key is {FILE_KEY_BYTES} bytes, not {len(key)}")
        self._aead = _file_aead(key)
        self._aad = fid.encode("ascii")

    def seal(self, index: int, chunk: bytes) -> bytes:
        return self._aead.encrypt(_chunk_nonce(index), chunk, self._aad)

    def open(self, index: int, data: bytes) -> Optional[bytes]:
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(_chunk_nonce(index), data, self._aad)
        except InvalidTag:
            return None
