"""Cryptography: identity, signatures, sealed datagrams, end-to-end boxes.

The only module that imports ``cryptography`` (an optional extra:
``pip install 'meshchat[secure]'``). Without it the rest of meshchat works as
before; ``available()`` says whether it is there, and ``require(option)``
gives the one-line error an option that needs keys exits with. Nothing here
is a construction of our own: Ed25519, X25519, HKDF-SHA256 and
ChaCha20-Poly1305 are used as the library provides them.
"""

from typing import Optional

try:  # the optional extra
    import cryptography  # noqa: F401
except ImportError:  # pragma: no cover - depends on the install
    _MISSING: Optional[str] = "the 'cryptography' package is not installed"
else:
    _MISSING = None

EXTRA = "meshchat[secure]"


class CryptoUnavailable(RuntimeError):
    """An option needs keys and the optional extra is not installed."""


def available() -> bool:
    return _MISSING is None


def require(option: str) -> None:
    """Raise CryptoUnavailable with the one line the user sees if the extra is missing."""
    if _MISSING is not None:
        raise CryptoUnavailable(f"{option} needs the secure extra: pip install '{EXTRA}' ({_MISSING})")
