"""Loading keys and certificates from files, with errors that name the file.

Everything read here may have been swapped, truncated or mistyped by someone: every failure is a
:class:`CredentialError` naming the path and the problem, never a bare traceback.  Policy about
key types lives here too, because it is a property of what a file may hold: a server decrypts
knocks with ECDH, so its key must be an EC key on a curve of the protocol's suites (P-256, P-384); a
client only signs, so EC, Ed25519 and RSA (2048 bits or more) all work.  So does the profile of a
server's certificate (:func:`server_certificate_problem`), which the server checks on its own and the
client on the one it is given.

A client's key may also live on a PKCS#11 token: :func:`load_client_credentials` takes a ``pkcs11:`` URI
wherever a .pfx path is accepted (the CLI, profiles, the library) and hands back credentials whose key is
then a :class:`~sknock.token.TokenSigner` (see :mod:`sknock.token`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from .certificate import describe_name, tolerate_zero_serial
from .errors import CredentialError, ServerCertificateError
from .fileio import read_bounded
from .protocol import SUITE_CURVES_TEXT, SUITES, ClientKey, KnockSigner

__all__ = [
    "ClientCredentials",
    "ServerCredentials",
    "load_client_pfx",
    "load_client_credentials",
    "client_key_problem",
    "load_server_pfx",
    "load_certificate",
    "load_certificates",
    "load_certificate_request",
    "resolve_password",
    "SERVER_CURVES",
    "CLIENT_CURVES",
    "server_certificate_problem",
]

#: The curves a server key may be on: those of the protocol's suites, since every knock is encrypted to
#: the server certificate's key with ECDH on its curve (P-256 and P-384; a P-521 server could be knocked
#: by no client).
SERVER_CURVES: tuple[str, ...] = tuple(suite.curve.name for suite in SUITES.values())
#: The NIST curves sknock accepts for a client's EC signatures.
CLIENT_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_MIN_RSA_BITS = 2048
# Bound what we read: a PKCS#12 or certificate bundle bigger than this is not one.
_MAX_FILE_SIZE = 1 << 20


class ClientCredentials(NamedTuple):
    """A client's signing key (in memory, or a signer on a token), its certificate, and the CA
    certificates that came with it."""

    key: ClientKey | KnockSigner
    certificate: x509.Certificate
    ca_certificates: tuple[x509.Certificate, ...]


class ServerCredentials(NamedTuple):
    """The server's ECDH key, its certificate, and the CA certificates that came with it."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    ca_certificates: tuple[x509.Certificate, ...]


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    return read_bounded(path, limit=_MAX_FILE_SIZE, what=what, error=CredentialError)


def _password_bytes(password: str | bytes | None) -> bytes | None:
    if password is None or isinstance(password, bytes):
        return password
    return password.encode("utf-8")


def _load_pkcs12(
    path: str | os.PathLike[str], password: str | bytes | None, what: str
) -> tuple[object, x509.Certificate, tuple[x509.Certificate, ...]]:
    data = _read(path, what)
    try:
        with tolerate_zero_serial():
            bundle = pkcs12.load_pkcs12(data, _password_bytes(password))
    except ValueError:
        raise CredentialError(f"{what} {path}: wrong password, or not a PKCS#12 file") from None
    except TypeError as exc:  # e.g. a password given for an unencrypted file, or the reverse
        raise CredentialError(f"{what} {path}: cannot open: {exc}") from None
    if bundle.key is None:
        raise CredentialError(f"{what} {path}: holds no private key")
    if bundle.cert is None:
        raise CredentialError(f"{what} {path}: holds no certificate")
    cas = tuple(c.certificate for c in bundle.additional_certs)
    return bundle.key, bundle.cert.certificate, cas


def _key_matches(key: object, cert: x509.Certificate) -> bool:
    public = getattr(key, "public_key", None)
    if public is None:
        return False
    result: bool = public() == cert.public_key()
    return result


def load_server_pfx(path: str | os.PathLike[str], password: str | bytes | None) -> ServerCredentials:
    """Load the server's PKCS#12: an EC key on a curve of :data:`SERVER_CURVES`, its certificate, and CA
    certificates."""
    key, cert, cas = _load_pkcs12(path, password, "server PKCS#12")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in SERVER_CURVES:
        raise CredentialError(
            f"server PKCS#12 {path}: unsupported key type {_describe(key)}; the server needs EC {SUITE_CURVES_TEXT} "
            "(the curves knocks are encrypted with)"
        )
    if not _key_matches(key, cert):
        raise CredentialError(f"server PKCS#12 {path}: the private key does not match the certificate")
    problem = server_certificate_problem(cert)
    if problem is not None:
        raise ServerCertificateError(
            f"server PKCS#12 {path}: {describe_name(cert.subject)} is not a server certificate: {problem}"
        )
    return ServerCredentials(key, cert, cas)


def load_client_pfx(path: str | os.PathLike[str], password: str | bytes | None) -> ClientCredentials:
    """Load a client's PKCS#12: an EC (P-256 or larger), Ed25519 or RSA (>= 2048 bits) key, its
    certificate, and CA certificates."""
    key, cert, cas = _load_pkcs12(path, password, "client PKCS#12")
    problem = client_key_problem(key)
    if problem is not None:
        raise CredentialError(f"client PKCS#12 {path}: {problem}")
    assert isinstance(key, ClientKey)
    if not _key_matches(key, cert):
        raise CredentialError(f"client PKCS#12 {path}: the private key does not match the certificate")
    return ClientCredentials(key, cert, cas)


def client_key_problem(key: object) -> str | None:
    """Why ``key`` (private or public) cannot sign knocks, in a few words; None when it can: EC P-256,
    P-384 or P-521, Ed25519, or RSA of 2048 bits or more (what the server verifies)."""
    ok = (
        (isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and key.curve.name in CLIENT_CURVES)
        or isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey)
        or (isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS)
    )
    if ok:
        return None
    return (f"unsupported key type {_describe(key)}; "
            "a client needs EC P-256/P-384/P-521, Ed25519 or RSA of 2048 bits or more")


#: Where a secret (a .pfx password or a token PIN) comes from when it is needed: the bytes, or a function
#: asked with a prompt that names what it is for (the CLIs pass one over :func:`resolve_password`).
Secret = str | bytes | Callable[[str], bytes] | None


def load_client_credentials(
    spec: str | os.PathLike[str],
    secret: Secret = None,
    *,
    certificate: str | os.PathLike[str] | None = None,
) -> ClientCredentials:
    """A client's credentials from ``spec``: a PKCS#12 file (``secret`` is its password) or a ``pkcs11:``
    URI (RFC 7512) naming a key on a token (``secret`` is the PIN, unless the URI carries one).

    A callable ``secret`` is called only when the secret is needed, with a prompt naming the file or
    token.  For a token, the client certificate is ``certificate`` (a file) when given, else the one the
    token holds with the key's id; the key and certificate are checked to match.  Everything that fails
    is a :class:`CredentialError` (:class:`~sknock.errors.TokenError` for a token) of one line."""
    if is_pkcs11_uri(spec):
        return _load_token_credentials(str(spec), secret, certificate)
    if certificate is not None:
        raise CredentialError(f"client PKCS#12 {spec}: holds its certificate; a separate certificate file is "
                              "only for a key on a token")
    password = secret(f"Password for {spec}: ") if callable(secret) else secret
    return load_client_pfx(spec, password)


#: What a ``pkcs11:`` URI (RFC 7512) begins with.  Here, not in :mod:`sknock.token`, so that telling a
#: URI from a .pfx path does not import the token module on the everyday .pfx path (ssh-proxy's start-up).
PKCS11_SCHEME = "pkcs11:"


def is_pkcs11_uri(text: object) -> bool:
    """Whether ``text`` is meant as a ``pkcs11:`` URI (rather than a file name)."""
    return isinstance(text, str) and text[: len(PKCS11_SCHEME)].lower() == PKCS11_SCHEME


def _load_token_credentials(
    uri: str, secret: Secret, certificate: str | os.PathLike[str] | None
) -> ClientCredentials:
    from .token import open_token_key

    pin: Callable[[str], bytes] | None
    if callable(secret):
        pin = secret
    elif secret is None:
        pin = None
    else:
        given = _password_bytes(secret)
        pin = lambda _prompt: given or b""  # noqa: E731
    # A certificate file is read before the token is touched: a typo costs no PIN attempt.
    cert_from_file = load_certificate(certificate) if certificate is not None else None
    found = open_token_key(uri, pin)
    signer = found.signer
    try:
        cert = cert_from_file or found.certificate
        if cert is None:
            raise CredentialError(f"{signer.uri.describe()}: no certificate on the token with the key's id; "
                                  "give the certificate file (sknock-ca client NAME --csr FILE wrote it)")
        public = cert.public_key()
        problem = client_key_problem(public)
        if problem is not None:
            raise CredentialError(f"{signer.uri.describe()}: certificate {describe_name(cert.subject)}: {problem}")
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise CredentialError(f"{signer.uri.describe()}: certificate {describe_name(cert.subject)} is not "
                                  "for an EC key, as the token's is")
        signer.bind(public)
    except BaseException:
        signer.close()
        raise
    return ClientCredentials(signer, cert, ())


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def server_certificate_problem(cert: x509.Certificate) -> str | None:
    """What keeps ``cert`` from being a sknock server's certificate, in a few words; None when nothing does.

    The server profile (docs/pki.md): an EC key on a curve of the protocol's suites (P-256 or P-384: every
    knock is encrypted to it with ECDH); not a CA (basicConstraints CA:TRUE or keyUsage keyCertSign);
    keyUsage, where present, with keyAgreement; EKU, where present, with serverAuth.  Dates and the issuer
    are the caller's business (the server checks its own, a client the one it is given).
    """
    try:
        key = cert.public_key()
    except Exception as exc:  # noqa: BLE001 -- an unknown or malformed key: say so
        return f"its key cannot be read ({type(exc).__name__})"
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SERVER_CURVES:
        return f"its key is {_describe(key)}, not EC {SUITE_CURVES_TEXT} (knocks are encrypted to it with ECDH)"
    try:
        with tolerate_zero_serial():  # the original sKnock's server names its CA's serial 0 in its AKI
            extensions = cert.extensions
        basic = _extension(extensions, x509.BasicConstraints)
        usage = _extension(extensions, x509.KeyUsage)
        eku = _extension(extensions, x509.ExtendedKeyUsage)
    except Exception as exc:  # noqa: BLE001 -- duplicate or undecodable extensions
        return f"its extensions are malformed ({type(exc).__name__})"
    if basic is not None and basic.ca:
        return "it is a CA certificate (basicConstraints CA:TRUE)"
    if usage is not None and usage.key_cert_sign:
        return "it is a CA certificate (keyUsage keyCertSign)"
    if usage is not None and not usage.key_agreement:
        return "its keyUsage lacks keyAgreement (knocks are encrypted to its key with ECDH)"
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        if ExtendedKeyUsageOID.CLIENT_AUTH in eku:
            return "its EKU has clientAuth but not serverAuth: it is a client's certificate"
        return "its EKU lacks serverAuth"
    return None


_X = TypeVar("_X", bound=x509.ExtensionType)


def _extension(extensions: x509.Extensions, kind: type[_X]) -> _X | None:
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Load one certificate, PEM or DER (the original sKnock's ``.cer`` files are DER)."""
    data = _read(path, "certificate")
    try:
        with tolerate_zero_serial():
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CredentialError(f"certificate {path}: not a PEM or DER certificate ({exc})") from None


def load_certificate_request(path: str | os.PathLike[str]) -> x509.CertificateSigningRequest:
    """Load a PKCS#10 certificate request, PEM or DER (its signature is the CA's to check:
    :meth:`sknock.ca.CertificateAuthority.issue_client_for_request`)."""
    data = _read(path, "certificate request")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise CredentialError(f"certificate request {path}: not a PEM or DER PKCS#10 request ({exc})") from None


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Load a PEM bundle (one or more certificates) or a single DER certificate."""
    data = _read(path, "certificate file")
    try:
        with tolerate_zero_serial():
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificates(data)
            return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise CredentialError(f"certificate file {path}: not PEM or DER certificates ({exc})") from None


def resolve_password(
    password_file: str | os.PathLike[str] | None,
    *,
    env_var: str = "SKNOCK_PFX_PASSWORD",
    prompt: str | None = None,
    interactive: bool = False,
) -> bytes:
    """Find a password without ever putting it on a command line.

    In order: the first line of ``password_file`` (without its newline), the environment variable
    ``env_var``, then a prompt on the terminal when ``interactive``.  Otherwise CredentialError.
    """
    if password_file is not None:
        data = _read(password_file, "password file")
        line = data.split(b"\n", 1)[0].removesuffix(b"\r")
        if not line:
            raise CredentialError(f"password file {password_file}: first line is empty")
        return line
    value = os.environ.get(env_var)
    if value:
        return value.encode("utf-8")
    if interactive:
        try:
            import getpass  # only for a prompt: not on every start-up

            typed = getpass.getpass(prompt or "Password: ")
        except (EOFError, KeyboardInterrupt):
            raise CredentialError("no password entered") from None
        if not typed:
            raise CredentialError("empty password entered")
        return typed.encode("utf-8")
    raise CredentialError(f"no password: give a password file, set {env_var}, or run interactively")
