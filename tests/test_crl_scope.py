"""A CRL stands for every certificate of its CA, or it is refused; and which CAs have a CRL.

The verifier takes a serial's absence from the issuer's CRL as "not revoked", so a CRL that covers only
part of its CA's certificates (a delta CRL, an issuingDistributionPoint limited to some certificates or
reasons, an indirect CRL) or carries a critical extension nobody here understands must not be taken as
the CA's CRL.  Real CRLs, signed by a real CA key.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ObjectIdentifier

from sknock import ca as ca_lib
from sknock.errors import CertificateError
from sknock.trust import ClientVerifier, cas_without_crl, crl_signer, load_crl
from tests.pki import PASSWORD_BYTES, TestPKI, at

NOW = TestPKI.now()


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> ca_lib.CertificateAuthority:
    return ca_lib.init_ca(tmp_path_factory.mktemp("scope") / "ca", PASSWORD_BYTES, name="Scope CA",
                          clock=at(NOW.timestamp()))


def _crl(
    authority: ca_lib.CertificateAuthority,
    extensions: list[tuple[x509.ExtensionType, bool]] = [],  # noqa: B006 -- read only
    entry_extensions: list[tuple[x509.ExtensionType, bool]] = [],  # noqa: B006 -- read only
) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.certificate.subject)
        .last_update(NOW - dt.timedelta(minutes=1))
        .next_update(NOW + dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(7), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    entry = x509.RevokedCertificateBuilder().serial_number(1234).revocation_date(NOW - dt.timedelta(minutes=1))
    for extension, critical in entry_extensions:
        entry = entry.add_extension(extension, critical=critical)
    builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(authority.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def _idp(**limits: object) -> x509.IssuingDistributionPoint:
    fields: dict[str, object] = {
        "full_name": [x509.UniformResourceIdentifier("http://pki.example/scope.crl")],
        "relative_name": None,
        "only_contains_user_certs": False,
        "only_contains_ca_certs": False,
        "only_some_reasons": None,
        "indirect_crl": False,
        "only_contains_attribute_certs": False,
    }
    fields.update(limits)
    return x509.IssuingDistributionPoint(**fields)  # type: ignore[arg-type]


def test_a_plain_crl_and_one_naming_only_its_distribution_point_load(authority: ca_lib.CertificateAuthority) -> None:
    for data in (_crl(authority), _crl(authority, [(_idp(), True)])):
        crl = load_crl(data, [authority.certificate], source="scope.crl")
        assert crl.get_revoked_certificate_by_serial_number(1234) is not None


@pytest.mark.parametrize(
    ("extensions", "entry_extensions", "why"),
    [
        ([(x509.DeltaCRLIndicator(6), True)], [], "delta CRL"),
        ([(_idp(only_contains_user_certs=True), True)], [], "limits it to some certificates"),
        ([(_idp(only_contains_ca_certs=True), True)], [], "limits it to some certificates"),
        ([(_idp(only_some_reasons=frozenset({x509.ReasonFlags.key_compromise})), True)], [], "or reasons"),
        ([(_idp(indirect_crl=True), True)], [], "limits it"),
        ([(x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"), True)], [],
         "critical extension 1.3.6.1.4.1.55555.1 is not understood"),
        ([], [(x509.CertificateIssuer([x509.DNSName("other.example")]), True)], "an entry carries critical"),
    ],
    ids=["delta", "user-certs-only", "ca-certs-only", "some-reasons", "indirect", "unknown-critical", "entry"],
)
def test_a_crl_that_covers_only_part_of_its_ca_is_refused(
    authority: ca_lib.CertificateAuthority,
    extensions: list[tuple[x509.ExtensionType, bool]],
    entry_extensions: list[tuple[x509.ExtensionType, bool]],
    why: str,
) -> None:
    data = _crl(authority, extensions, entry_extensions)
    with pytest.raises(CertificateError, match="CRL partial.crl of CN=Scope CA: ") as info:
        load_crl(data, [authority.certificate], source="partial.crl")
    assert why in str(info.value)
    assert info.value.reason == "crl-unavailable"


def test_an_unknown_non_critical_extension_is_ignored(authority: ca_lib.CertificateAuthority) -> None:
    unknown = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.2"), b"\x05\x00")
    assert load_crl(_crl(authority, [(unknown, False)]), [authority.certificate], source="x") is not None


def test_which_cas_have_a_crl(pki: TestPKI) -> None:
    root, sub = pki.ca_cert, pki.intermediate.certificate
    assert crl_signer(pki.crl, [sub, root]) == root
    assert crl_signer(pki.intermediate_crl, [root, sub]) == sub
    assert crl_signer(pki.crl, [pki.stranger_ca.certificate]) is None  # same name, other key
    assert cas_without_crl([root, sub], [pki.crl, pki.intermediate_crl]) == []
    assert cas_without_crl([root, sub], [pki.intermediate_crl]) == [root]
    assert cas_without_crl([root, sub], []) == [root, sub]


def test_with_the_root_crl_alone_clients_of_the_intermediate_are_refused(pki: TestPKI) -> None:
    """What cas_without_crl warns of: the root's CRL says the intermediate is not revoked, but nothing
    says whether bob is."""
    verifier = ClientVerifier([pki.ca_cert], [pki.intermediate.certificate], [pki.crl], require_crl=True)
    with pytest.raises(CertificateError, match="issuer CN=sub-ca of CN=bob: no CRL loaded") as info:
        verifier.verify(pki.bob.certificate, pki.now())
    assert info.value.reason == "crl-unavailable"

