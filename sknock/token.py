"""Client keys that never leave a PKCS#11 token (a YubiKey's PIV applet, a TPM, an HSM, SoftHSM).

A token is named by a ``pkcs11:`` URI (RFC 7512), for instance::

    pkcs11:token=alice;id=%01;type=private?module-path=/usr/lib/x86_64-linux-gnu/libykcs11.so

:func:`parse_pkcs11_uri` reads one strictly: an unknown, repeated, empty or malformed attribute is a
:class:`~sknock.errors.TokenError` naming it.  :func:`open_token_key` loads the module, finds the token
and the private key (by ``id`` and/or ``object``, the label), logs in with the PIN and returns a
:class:`TokenSigner`: the :class:`~sknock.protocol.KnockSigner` that signs each knock on the token
(CKM_ECDSA over a SHA-256 digest computed here, turned into the DER signature the protocol carries).
The ephemeral ECDH of every knock stays in software; only signing needs the token.  Every signature is
checked against the public key before it is used, so a token that holds another key than the
certificate's, or that signs wrongly, is reported rather than sent.

The PIN comes, in this order, from the URI's ``pin-value``, its ``pin-source`` (a file), or the
caller's :data:`PinSource` (the CLI: ``--password-file``, ``$SKNOCK_TOKEN_PIN``, a prompt on a
terminal).  :func:`token_csr` makes a certificate request signed on the token, for ``sknock-ca client
NAME --csr FILE``, so the private key is never exported; ``sknock-token csr URI`` (:mod:`sknock.cli.token`)
runs it.

The binding is python-pkcs11 (the ``token`` extra: ``pip install sknock[token]``), imported only when a
token is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from .credentials import PKCS11_SCHEME as SCHEME
from .credentials import is_pkcs11_uri
from .errors import TokenError
from .protocol.seal import ecdsa_signature_size

if TYPE_CHECKING:
    import pkcs11

__all__ = [
    "SCHEME",
    "PIN_ENV",
    "Pkcs11Uri",
    "PinSource",
    "TokenSigner",
    "TokenKey",
    "is_pkcs11_uri",
    "parse_pkcs11_uri",
    "open_token_key",
    "token_csr",
]

#: The environment variable a token's PIN may come from (the CLIs; the library takes a :data:`PinSource`).
PIN_ENV = "SKNOCK_TOKEN_PIN"
#: Asked for the PIN with a prompt naming the token; returns it, or raises TokenError/CredentialError.
PinSource = Callable[[str], bytes]

# RFC 7512, section 2.3: the attributes of the path and of the query.
_PATH_ATTRIBUTES = (
    "token", "manufacturer", "serial", "model", "library-manufacturer", "library-version",
    "library-description", "object", "type", "id", "slot-description", "slot-manufacturer", "slot-id",
)
_QUERY_ATTRIBUTES = ("pin-source", "pin-value", "module-name", "module-path")
# Attributes RFC 7512 defines that sknock does not match on: refused by open_token_key (never silently
# ignored: a URI that names a library or slot by description must not pick another one).
_UNHONOURED = ("library-manufacturer", "library-version", "library-description", "slot-description",
               "slot-manufacturer", "module-name")
_TYPES = ("public", "private", "cert", "secret-key", "data")
# RFC 3986 unreserved characters and the sub-delimiters RFC 7512 lets stand unescaped in a value.
_PATH_VALUE = re.compile(r"^(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=&]|%[0-9A-Fa-f]{2})*$")
_QUERY_VALUE = re.compile(r"^(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=/?|;]|%[0-9A-Fa-f]{2})*$")
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_DIGITS = re.compile(r"^[0-9]{1,19}$")
_VERSION = re.compile(r"^[0-9]{1,9}(?:\.[0-9]{1,9})?$")
_MAX_URI = 4096
_MAX_PIN_FILE = 256

# EC_PARAMS (a DER OID) of the client curves a token key may be on.
_CURVES: dict[bytes, ec.EllipticCurve] = {
    bytes.fromhex("06082a8648ce3d030107"): ec.SECP256R1(),
    bytes.fromhex("06052b81040022"): ec.SECP384R1(),
    bytes.fromhex("06052b81040023"): ec.SECP521R1(),
}


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI: each attribute given, decoded (``id`` as bytes, the rest as text).

    :meth:`describe` names the token and key without the PIN; ``str()`` gives the URI back (with
    ``pin-value`` if it had one: never log it)."""

    path: tuple[tuple[str, str | bytes], ...] = ()
    query: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | None:
        """The text value of attribute ``name`` (not ``id``), or None when the URI does not give it."""
        for key, value in (*self.path, *self.query):
            if key == name:
                assert isinstance(value, str)
                return value
        return None

    @property
    def id(self) -> bytes | None:
        """The ``id`` attribute (CKA_ID) as bytes, or None."""
        for key, value in self.path:
            if key == "id":
                assert isinstance(value, bytes)
                return value
        return None

    @property
    def token(self) -> str | None:
        """The token's label (``token``)."""
        return self.get("token")

    @property
    def object(self) -> str | None:
        """The key's label (``object``)."""
        return self.get("object")

    @property
    def module_path(self) -> str | None:
        """The PKCS#11 module to load (``module-path``)."""
        return self.get("module-path")

    def describe(self) -> str:
        """Token and key as a person names them, for messages: never the PIN."""
        parts = [f"token {self.token!r}" if self.token is not None else "the token"]
        if self.object is not None:
            parts.append(f"object {self.object!r}")
        if self.id is not None:
            parts.append(f"id {self.id.hex()}")
        return ", ".join(parts)

    def __str__(self) -> str:
        path = ";".join(f"{k}={_quote(v, '')}" for k, v in self.path)
        query = "&".join(f"{k}={_quote(v, '/')}" for k, v in self.query)
        return SCHEME + path + (f"?{query}" if query else "")


def _quote(value: str | bytes, safe: str) -> str:
    raw = value if isinstance(value, bytes) else value.encode("utf-8")
    keep = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~" + safe.encode())
    return "".join(chr(b) if b in keep else f"%{b:02X}" for b in raw)


def _unquote(value: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "%":
            out.append(int(value[i + 1 : i + 3], 16))  # the value matched %XX already
            i += 3
        else:
            out += value[i].encode("ascii")
            i += 1
    return bytes(out)


def parse_pkcs11_uri(text: str) -> Pkcs11Uri:
    """Parse a ``pkcs11:`` URI strictly (RFC 7512); TokenError naming the bad attribute otherwise.

    Refused: another scheme, an attribute RFC 7512 does not define (vendor ``x-`` ones included), one
    given twice, an empty value, a character that must be percent-encoded, a broken ``%XX``, text that is
    not UTF-8, a ``type`` other than RFC 7512's, a ``slot-id`` or ``library-version`` that is not a number.
    """
    if not isinstance(text, str) or not is_pkcs11_uri(text):
        raise TokenError(f"not a pkcs11: URI: {text!r}"[:200])
    if len(text) > _MAX_URI:
        raise TokenError(f"pkcs11 URI: {len(text)} characters is too long (at most {_MAX_URI})")
    rest = text[len(SCHEME) :]
    path_text, _, query_text = rest.partition("?")
    if "#" in rest:
        raise TokenError("pkcs11 URI: a '#' fragment is not allowed")
    path = tuple(_attributes(path_text, ";", _PATH_ATTRIBUTES, _PATH_VALUE, "path"))
    query_pairs = _attributes(query_text, "&", _QUERY_ATTRIBUTES, _QUERY_VALUE, "query") if "?" in rest else []
    query = tuple((k, v) for k, v in query_pairs if isinstance(v, str))
    seen: set[str] = set()
    for name, _ in (*path, *query):
        if name in seen:
            raise TokenError(f"pkcs11 URI: attribute {name} is given twice")
        seen.add(name)
    return Pkcs11Uri(path, query)


def _attributes(
    text: str, separator: str, known: Sequence[str], allowed: re.Pattern[str], part: str
) -> list[tuple[str, str | bytes]]:
    if not text:
        return []
    out: list[tuple[str, str | bytes]] = []
    for item in text.split(separator):
        name, eq, raw = item.partition("=")
        shown = name if _NAME.match(name) else repr(name)[:40]
        if not eq:
            raise TokenError(f"pkcs11 URI: {part} attribute {shown} has no '=value'")
        if name not in known:
            other = "query" if part == "path" else "path"
            where = f" (it belongs in the {other})" if name in (*_PATH_ATTRIBUTES, *_QUERY_ATTRIBUTES) else ""
            raise TokenError(f"pkcs11 URI: unknown {part} attribute {shown}{where}")
        if not raw:
            raise TokenError(f"pkcs11 URI: attribute {name} is empty")
        if not allowed.match(raw):
            raise TokenError(f"pkcs11 URI: attribute {name} has a character that must be percent-encoded, or a bad %XX")
        value = _unquote(raw)
        if name == "id":
            out.append((name, value))
            continue
        try:
            decoded = value.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenError(f"pkcs11 URI: attribute {name} is not UTF-8 text") from None
        if name == "type" and decoded not in _TYPES:
            raise TokenError(f"pkcs11 URI: attribute type must be one of {', '.join(_TYPES)}, not {decoded!r}")
        if name == "slot-id" and not _DIGITS.match(decoded):
            raise TokenError(f"pkcs11 URI: attribute slot-id must be a decimal number, not {decoded!r}")
        if name == "library-version" and not _VERSION.match(decoded):
            raise TokenError(f"pkcs11 URI: attribute library-version must be M or M.N, not {decoded!r}")
        out.append((name, decoded))
    return out


# -- the token -----------------------------------------------------------------------------------------


@dataclass
class TokenSigner:
    """A private key on a token, as a :class:`~sknock.protocol.KnockSigner` (EC keys: CKM_ECDSA).

    Holds the logged-in session for as long as it lives (:meth:`close` ends it).  One signature at a time
    (a PKCS#11 session runs one operation at a time), so one signer may serve several threads."""

    uri: Pkcs11Uri
    curve: ec.EllipticCurve
    _key: Any = field(repr=False)
    _session: Any = field(repr=False)
    _public: ec.EllipticCurvePublicKey | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The key's public half (from the token's public key object or the certificate)."""
        if self._public is None:
            raise TokenError(f"{self.uri.describe()}: no public key known for the token's key (give its certificate)")
        return self._public

    def bind(self, public: ec.EllipticCurvePublicKey) -> None:
        """Check every signature against ``public`` (the certificate's key); TokenError when the token's
        own public key object says it is another key."""
        if self._public is not None and self._public != public:
            raise TokenError(f"{self.uri.describe()}: the key on the token does not match the certificate")
        if public.curve.name != self.curve.name:
            raise TokenError(f"{self.uri.describe()}: the certificate's key is on {public.curve.name}, "
                             f"the token's on {self.curve.name}")
        self._public = public

    @property
    def signature_size(self) -> int:
        """The largest DER ECDSA signature on the key's curve."""
        return ecdsa_signature_size(self.curve)

    def sign(self, message: bytes) -> bytes:
        """ECDSA-SHA256 over ``message``: SHA-256 here, the raw ECDSA on the token, DER-encoded here, then
        checked against the public key (TokenError when it does not verify: never a bad knock sent)."""
        import pkcs11

        public = self.public_key()
        digest = hashlib.sha256(message).digest()
        with self._lock:
            try:
                raw = bytes(self._key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA))
            except pkcs11.PKCS11Error as exc:
                raise _token_error(self.uri, exc, "cannot sign") from None
        half = len(raw) // 2
        if not raw or len(raw) % 2:
            raise TokenError(f"{self.uri.describe()}: the token returned a malformed ECDSA signature")
        der = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
        try:
            public.verify(der, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise TokenError(
                f"{self.uri.describe()}: the token's signature does not verify with the certificate's key "
                "(another key on the token?)"
            ) from None
        return der

    def close(self) -> None:
        """Log out and close the session (the signer signs no more)."""
        with self._lock, contextlib.suppress(Exception):  # a session that the token already dropped
            self._session.close()


@dataclass(frozen=True, slots=True)
class TokenKey:
    """What :func:`open_token_key` found: the signer and, when the token holds one with the key's id, the
    certificate."""

    signer: TokenSigner
    certificate: x509.Certificate | None


def _token_error(uri: Pkcs11Uri, exc: Exception, doing: str) -> TokenError:
    import pkcs11

    who = uri.describe()
    if isinstance(exc, pkcs11.PinIncorrect | pkcs11.PinLenRange | pkcs11.PinInvalid):
        return TokenError(f"{who}: wrong PIN")
    if isinstance(exc, pkcs11.PinLocked):
        return TokenError(f"{who}: the PIN is locked (too many wrong PINs); unlock it with the token's SO PIN or PUK")
    if isinstance(exc, pkcs11.PinExpired):
        return TokenError(f"{who}: the PIN has expired; change it on the token first")
    if isinstance(exc, pkcs11.UserPinNotInitialized):
        return TokenError(f"{who}: the token has no user PIN set; initialise it first")
    if isinstance(exc, pkcs11.UserNotLoggedIn) and doing == "cannot sign":
        return TokenError(f"{who}: the key asks for the PIN at every signature (CKA_ALWAYS_AUTHENTICATE, e.g. PIV "
                          "slot 9c); use a key without it (PIV slot 9a)")
    if isinstance(exc, pkcs11.TokenNotPresent | pkcs11.DeviceRemoved | pkcs11.SessionHandleInvalid):
        return TokenError(f"{who}: the token is not present (removed?)")
    detail = str(exc).strip() or "no detail"
    return TokenError(f"{who}: {doing}: PKCS#11 {type(exc).__name__} ({detail[:100]})")


def _load_module(uri: Pkcs11Uri) -> Any:
    for name in _UNHONOURED:
        if uri.get(name) is not None:
            raise TokenError(f"pkcs11 URI: attribute {name} is not supported by sknock (name the token by "
                             "token/serial/manufacturer/model/slot-id and the module by module-path)")
    type_ = uri.get("type")
    if type_ is not None and type_ != "private":
        raise TokenError(f"pkcs11 URI: type={type_}: name the private key (type=private) or leave type out")
    module = uri.module_path
    if module is None:
        raise TokenError("pkcs11 URI: module-path is missing (the PKCS#11 module to load, e.g. "
                         "module-path=/usr/lib/x86_64-linux-gnu/libykcs11.so)")
    path = Path(module)
    if not path.is_absolute():
        raise TokenError(f"pkcs11 URI: module-path {module!r} must be an absolute path")
    if not path.is_file():
        raise TokenError(f"PKCS#11 module {module}: no such file")
    try:
        import pkcs11
    except ImportError:
        raise TokenError("PKCS#11 tokens need python-pkcs11: pip install 'sknock[token]'") from None
    try:
        return pkcs11.lib(str(path))
    except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
        raise TokenError(f"PKCS#11 module {module}: cannot load it ({type(exc).__name__}: {str(exc)[:100]})") from None


def _find_token(lib: Any, uri: Pkcs11Uri) -> Any:
    import pkcs11

    serial = uri.get("serial")
    slot_id = uri.get("slot-id")
    try:
        tokens = [
            token for token in (
                slot.get_token() for slot in lib.get_slots(token_present=True)
                if slot_id is None or slot.slot_id == int(slot_id)
            )
            if token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED
        ]
        matching = [
            t for t in tokens
            if (uri.token is None or t.label == uri.token)
            and (serial is None or t.serial.decode("utf-8", "replace").strip() == serial)
            and (uri.get("manufacturer") is None or t.manufacturer_id == uri.get("manufacturer"))
            and (uri.get("model") is None or t.model == uri.get("model"))
        ]
    except pkcs11.PKCS11Error as exc:
        raise _token_error(uri, exc, "cannot list the tokens") from None
    if not matching:
        labels = ", ".join(repr(t.label) for t in tokens) or "none"
        raise TokenError(f"{uri.describe()}: no such token in {uri.module_path} (tokens there: {labels})")
    if len(matching) > 1:
        raise TokenError(f"{uri.describe()}: {len(matching)} tokens match in {uri.module_path}; "
                         "name one with token=, serial= or slot-id=")
    return matching[0]


def _pin(uri: Pkcs11Uri, pin: PinSource | None) -> bytes:
    if uri.get("pin-value") is not None:
        return str(uri.get("pin-value")).encode("utf-8")
    source = uri.get("pin-source")
    if source is not None:
        if source.startswith("file:"):
            source = source[len("file:") :]
            if source.startswith("//"):  # file:///path (an empty authority) or file://localhost/path
                host, _, rest = source[2:].partition("/")
                if host not in ("", "localhost"):
                    raise TokenError(f"pkcs11 URI: pin-source names another host ({host!r})")
                source = "/" + rest
        if not source.startswith("/"):
            raise TokenError("pkcs11 URI: pin-source must be a file (file:/path or /path); programs ('|...') "
                             "are not run")
        from .credentials import resolve_password  # the one place a secret's file is read

        return resolve_password(source, interactive=False)
    if pin is None:
        raise TokenError(f"{uri.describe()}: no PIN: give pin-source=FILE in the URI, a PIN file, "
                         f"set ${PIN_ENV}, or run on a terminal")
    return pin(f"PIN for {uri.describe()}: ")


def _ec_point(encoded: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING holding the point; some modules give the bare point."""
    if encoded[:1] == b"\x04" and len(encoded) > 2:
        length = encoded[1]
        offset = 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(encoded[2 : 2 + n], "big")
            offset = 2 + n
        if offset + length == len(encoded):
            return encoded[offset:]
    return encoded


def open_token_key(uri: Pkcs11Uri | str, pin: PinSource | None = None) -> TokenKey:
    """Find the private key ``uri`` names, log in, and return its :class:`TokenSigner` (with the
    certificate of the same id, when the token has one).  Every failure is a TokenError of one line."""
    if isinstance(uri, str):
        uri = parse_pkcs11_uri(uri)
    lib = _load_module(uri)
    import pkcs11

    token = _find_token(lib, uri)
    try:
        if token.flags & pkcs11.TokenFlag.USER_PIN_LOCKED:
            raise TokenError(f"{uri.describe()}: the PIN is locked (too many wrong PINs); unlock it with the "
                             "token's SO PIN or PUK")
        try:
            user_pin = _pin(uri, pin).decode("utf-8")
        except UnicodeDecodeError:
            raise TokenError(f"{uri.describe()}: the PIN is not UTF-8 text") from None
        session = token.open(user_pin=user_pin)
    except pkcs11.PKCS11Error as exc:
        raise _token_error(uri, exc, "cannot log in") from None
    try:
        return _find_key(session, uri)
    except BaseException:
        session.close()
        raise


def _find_key(session: pkcs11.Session, uri: Pkcs11Uri) -> TokenKey:
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    wanted: dict[Attribute, Any] = {}
    if uri.id is not None:
        wanted[Attribute.ID] = uri.id
    if uri.object is not None:
        wanted[Attribute.LABEL] = uri.object
    try:
        keys = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, **wanted}))
        if not keys:
            raise TokenError(f"{uri.describe()}: no private key (give the key's id= or object= in the URI)"
                             if not wanted else f"{uri.describe()}: no such private key on the token")
        if len(keys) > 1:
            raise TokenError(f"{uri.describe()}: {len(keys)} private keys match; name one with id= or object=")
        key: Any = keys[0]
        if key.key_type != KeyType.EC:
            raise TokenError(f"{uri.describe()}: the key is {key.key_type.name}; sknock signs on a token with "
                             "EC keys (P-256, P-384, P-521)")
        curve = _CURVES.get(bytes(key[Attribute.EC_PARAMS]))
        if curve is None:
            raise TokenError(f"{uri.describe()}: the key's curve is not P-256, P-384 or P-521")
        key_id = bytes(key[Attribute.ID])
        same = {Attribute.ID: key_id} if key_id else {Attribute.LABEL: key[Attribute.LABEL]}
        public = None
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, **same}):
            point = _ec_point(bytes(obj[Attribute.EC_POINT]))
            try:
                public = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
            except ValueError:
                raise TokenError(f"{uri.describe()}: the token's public key is not a point on its curve") from None
            break
        certificate = None
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, **same}):
            try:
                certificate = x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))
            except ValueError:
                raise TokenError(f"{uri.describe()}: the certificate on the token is not DER X.509") from None
            break
    except pkcs11.PKCS11Error as exc:
        raise _token_error(uri, exc, "cannot read the key") from None
    return TokenKey(TokenSigner(uri, curve, key, session, public), certificate)


# -- certificate requests ------------------------------------------------------------------------------

_ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")  # AlgorithmIdentifier ecdsa-with-SHA256


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
        (n.bit_length() + 7) // 8, "big"
    )
    return bytes([tag]) + length + body


def token_csr(signer: TokenSigner, common_name: str) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for the token key's public half with subject CN=``common_name``, signed on the
    token (the key never leaves it).  ``sknock-ca client NAME --csr FILE`` issues the certificate."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    spki = signer.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    info = _tlv(0x30, bytes.fromhex("020100") + subject.public_bytes() + spki + bytes.fromhex("a000"))
    signature = signer.sign(info)
    der = _tlv(0x30, info + _ECDSA_SHA256 + _tlv(0x03, b"\x00" + signature))
    csr = x509.load_der_x509_csr(der)
    if not csr.is_signature_valid:
        raise TokenError(f"{signer.uri.describe()}: the request signed on the token does not verify")
    return csr
