"""The errors sknock raises on purpose: here, every one that the library's callers meet; below, where the
server's own edges keep theirs.

One base class, :class:`SknockError`, so that callers (the daemon, the CLIs, applications) can catch
what sknock means to raise and let real bugs surface. Each error carries a message meant for a person:
it names the file, key or value and the reason.

Defined here: the errors of the library an application or a CLI calls -- the protocol and the verifier
(:class:`KnockRefused` with its :class:`Reason`), ports, credentials (keys on a PKCS#11 token too:
:class:`TokenError`), certificates, the client (with its configuration file of named servers,
:class:`ProfileError`), the CA (:class:`CAError`) and the server configuration (:class:`ConfigError`,
raised by the config and the capture alike).

Defined with their edge: an error that one edge of the server raises, and that only the server's own
processes and its command line meet (they catch :class:`SknockError`), stays in that edge's module,
beside the code whose failure it names.  They derive from :class:`SknockError` too, and are exactly
these (``tests/test_errors.py`` checks this list against the code):

* ``sknock.server.packet.PacketError``: a captured packet is not a plain UDP datagram for us (its
  ``reason`` is one of that module's ``REASONS``, counted by the capture, never raised past it);
* ``sknock.server.capture.CaptureError``: a capture socket cannot be opened;
* ``sknock.server.privsep.PrivsepError``: a message between a worker and the monitor (the server's root
  process) is malformed;
* ``sknock.server.privileges.PrivilegeError``: privileges cannot be dropped (the monitor's capabilities,
  a child's user), or its seccomp filter cannot be loaded;
* ``sknock.server.firewall.base.FirewallError``: a firewall backend cannot do what was asked;
* ``sknock.server.control.ControlError``: the control socket cannot be opened or does not answer;
* ``sknock.server.ledger.LedgerError``: the grant ledger cannot be read;
* ``sknock.server.instance.AlreadyRunning``: another knock server holds this network namespace;
* ``sknock.server.replaystore.ReplayStoreError``: the fleet's shared replay store (Redis) cannot confirm a
  claim; the monitor's replay gate turns it into refused (or, by choice, locally checked) knocks;
* ``sknock.server.service.InstallError``: ``sknock-server install-service`` cannot do one of its steps.

Not sknock errors: ``sknock.server.firewall.nfnetlink.NetlinkError`` is an ``OSError`` (a kernel's
answer) that the nftables backend turns into a ``FirewallError``;
``sknock.server.firewall.command.TemplateError`` is a ``ValueError`` of the template rule that its two
callers turn into a ``ConfigError`` (naming the key) or a ``FirewallError``; and exceptions whose names begin with
an underscore (``_Usage`` in the CLIs, ``_FetchFailed`` in the CRL refresher) are control flow inside one
module and never leave it.
"""

from __future__ import annotations

import enum

from .logsafe import log_safe

__all__ = [
    "SknockError",
    "PortSpecError",
    "CredentialError",
    "ServerCertificateError",
    "TokenError",
    "CertificateError",
    "KnockRefused",
    "Reason",
    "KnockBuildError",
    "ConfigError",
    "ClientError",
    "NotAuthorizedError",
    "ResolveError",
    "ProfileError",
    "CarrierUnavailableError",
    "CAError",
]


class SknockError(Exception):
    """Base class of every error sknock raises on purpose."""


class PortSpecError(SknockError, ValueError):
    """A port list (``tcp/22,udp/8000`` or the certificate form ``1.22,0.8000``) is malformed."""


class CredentialError(SknockError):
    """A key, certificate or PKCS#12 file could not be loaded: missing, unreadable, wrong password,
    or holding something sknock cannot use."""


class ServerCertificateError(CredentialError):
    """A certificate given as a server's is not fit to be one: a CA's, a client's, or one whose key knocks
    cannot be encrypted to.  Raised before anything is sent (client) or started (server)."""


class TokenError(CredentialError):
    """A client key on a PKCS#11 token cannot be used: a malformed ``pkcs11:`` URI (the message names the
    attribute), a module that does not load, no such token or key, a wrong or locked PIN, a token that
    refuses to sign.  One line naming the token or module and the reason (``sknock.token``)."""


#: Characters at most of a refusal's detail or a certificate error's message (see :func:`log_safe`).
DETAIL_LIMIT = 400


class CertificateError(SknockError):
    """A certificate is not acceptable: malformed, untrusted, expired, revoked, wrong key usage, or its
    authorization extension is malformed.  ``reason`` is the :class:`Reason` a knock carrying it is
    refused with.  The message may quote the certificate (its subject, an exception about it), so it is
    escaped with :func:`~sknock.logsafe.log_safe` here, whoever raises it."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(log_safe(message, DETAIL_LIMIT))
        self.reason = reason


class ClientError(SknockError):
    """The client library cannot knock as asked."""


class KnockBuildError(ClientError):
    """A knock cannot be built (for instance the client certificate is too large to fit one datagram)."""


class NotAuthorizedError(ClientError):
    """The client's own certificate does not name the port it asks to open (checked before sending)."""


class ResolveError(ClientError):
    """The server's host name does not resolve (to an address of the requested family)."""


class ProfileError(ClientError):
    """The client's configuration file of named servers (:mod:`sknock.clientconfig`) is invalid, or names
    no such server; the message names the file, the section (the server) and the key."""


class CarrierUnavailableError(ClientError):
    """The carrier asked for cannot be used here: over ICMP, this user may open neither a ping socket
    (``net.ipv4.ping_group_range``) nor a raw socket (``CAP_NET_RAW``).  Raised before anything is sent."""


class ConfigError(SknockError):
    """The server configuration is invalid; the message names the key and the problem."""


class CAError(SknockError):
    """A CA operation (:mod:`sknock.ca`, ``sknock-ca``) cannot be done: no CA in the directory, a name
    taken or unknown, a bad name, a key type a server cannot use."""


class Reason(enum.StrEnum):
    """Why the server refused a datagram: short, stable codes used in logs and counters.

    Listed in the order the verification pipeline checks them, cheapest first.
    """

    WRONG_DESTINATION = "wrong-destination"  # sent to an address that is not this host's (knockDestinations)
    BAD_LENGTH = "bad-length"
    BAD_MAGIC = "bad-magic"
    UNSUPPORTED_VERSION = "unsupported-version"
    UNSUPPORTED_SUITE = "unsupported-suite"
    MALFORMED_HEADER = "malformed-header"
    STALE = "stale"  # the clear, coarse timestamp is outside the window
    INSUFFICIENT_WORK = "insufficient-work"
    REPLAY_SEEN = "replay-seen"  # exact replay caught before any public-key operation
    WRONG_SERVER = "wrong-server"  # encrypted to another server's key
    DECRYPT_FAILED = "decrypt-failed"
    MALFORMED = "malformed"
    TIMESTAMP = "timestamp"  # the signed millisecond timestamp is outside the window
    REPLAY = "replay"  # the signed nonce was seen before
    CERT_INVALID = "cert-invalid"
    CERT_UNTRUSTED = "cert-untrusted"
    CERT_EXPIRED = "cert-expired"
    CERT_REVOKED = "cert-revoked"
    CRL_UNAVAILABLE = "crl-unavailable"
    BAD_SIGNATURE = "bad-signature"
    SOURCE_MISMATCH = "source-mismatch"
    SOURCE_REQUIRED = "source-required"
    NOT_AUTHORIZED = "not-authorized"
    OVERLOAD = "overload"
    # The monitor's last check, with a shared replay store (docs/fleet.md): the store could not say whether
    # another server of the fleet granted the knock (down, slow, or its memory too young), and
    # replayStoreFallback = refuse.
    REPLAY_UNCONFIRMED = "replay-unconfirmed"
    # Not a check: a bug met while handling one datagram.  The worker refuses that datagram with this
    # reason and goes on; the fuzz tests show that nothing a packet carries leads here.
    INTERNAL_ERROR = "internal-error"


class KnockRefused(SknockError):
    """The server refuses a datagram.  ``reason`` is a :class:`Reason`; ``detail`` is safe to log: it
    never holds key material or plaintext, and whatever it quotes from the datagram (a subject, an
    exception's text) is escaped here with :func:`~sknock.logsafe.log_safe`."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        detail = log_safe(detail, DETAIL_LIMIT) if detail else ""
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
