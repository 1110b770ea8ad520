"""Development PKI: one CA, one certificate per service, one per operator.

Every leaf certificate has exactly one URI SAN, its SPIFFE id, plus DNS/IP SANs so that a channel
can verify the server it reached: clients pin the expected service by overriding the TLS target
name with the service's name, which must be a DNS SAN of that service's certificate only.
Keys are ECDSA P-256 and are written with mode 0600. The CA's private key lives apart from the
folder services load (`<dir>-ca/`, see ca_key_dir), so a service never has the means to mint an
identity. Nothing here is meant for production: a real deployment brings certificates from its
own CA (SPIRE, cert-manager, ...), in the same layout.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from streammesh.mesh.identity import operator_id, service_id

__all__ = ["SERVICE_NAMES", "TlsMaterial", "init_pki", "issue_leaf"]

SERVICE_NAMES = ("gateway", "auth", "ingest", "processor", "storage")
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
_CA_DAYS = 3650
_LEAF_DAYS = 365


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes a listener or channel needs: the trust anchor and this process's own identity."""

    ca: bytes
    certificate_chain: bytes
    private_key: bytes

    @classmethod
    def load(cls, tls_dir: Path, name: str) -> TlsMaterial:
        """Read `<dir>/ca.pem`, `<dir>/<name>.pem` and `<dir>/<name>-key.pem`."""
        try:
            return cls(
                ca=(tls_dir / CA_FILE).read_bytes(),
                certificate_chain=(tls_dir / f"{name}.pem").read_bytes(),
                private_key=(tls_dir / f"{name}-key.pem").read_bytes(),
            )
        except FileNotFoundError as missing:
            raise FileNotFoundError(
                f"TLS material for {name!r} missing ({missing.filename}); run `streammesh pki init`"
            ) from missing


def ca_key_dir(directory: Path) -> Path:
    """Where the CA private key of the PKI in `directory` is kept: beside it, never inside."""
    return directory.parent / f"{directory.name}-ca"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _create_ca(directory: Path, trust_domain: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "StreamMesh dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"StreamMesh dev CA ({trust_domain})"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / CA_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_dir = ca_key_dir(directory)
    key_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    _write_private(key_dir / CA_KEY_FILE, _key_pem(key))


def issue_leaf(
    directory: Path,
    *,
    file_name: str,
    spiffe_id: str,
    dns_names: Iterable[str] = (),
    server: bool = True,
) -> None:
    """Issue `<file_name>.pem` / `<file_name>-key.pem` signed by the CA in `directory`."""
    ca_cert = x509.load_pem_x509_certificate((directory / CA_FILE).read_bytes())
    ca_key = serialization.load_pem_private_key(
        (ca_key_dir(directory) / CA_KEY_FILE).read_bytes(), None
    )
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the dev CA key must be an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    names += [x509.DNSName(dns) for dns in dns_names]
    if server:
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + (
        [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, file_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / f"{file_name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(directory / f"{file_name}-key.pem", _key_pem(key))


def init_pki(
    directory: Path,
    *,
    trust_domain: str,
    services: Iterable[str] = SERVICE_NAMES,
    operators: Iterable[str] = ("admin",),
    force: bool = False,
) -> list[str]:
    """Create the CA (unless present) and every missing certificate; return what was written.

    With `force`, everything is made anew, which invalidates every certificate issued before.
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    written: list[str] = []
    legacy_key = directory / CA_KEY_FILE
    if legacy_key.exists():  # PKIs made before the CA key moved out of the service folder
        ca_key_dir(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
        legacy_key.rename(ca_key_dir(directory) / CA_KEY_FILE)
    if force or not (directory / CA_FILE).exists():
        _create_ca(directory, trust_domain)
        written.append(CA_FILE)
        force = True
    for name in services:
        if force or not (directory / f"{name}.pem").exists():
            issue_leaf(
                directory,
                file_name=name,
                spiffe_id=service_id(trust_domain, name),
                dns_names=(name, f"{name}.streammesh", "localhost"),
            )
            written.append(f"{name}.pem")
    for name in operators:
        if force or not (directory / f"{name}.pem").exists():
            issue_leaf(
                directory,
                file_name=name,
                spiffe_id=operator_id(trust_domain, name),
                server=False,
            )
            written.append(f"{name}.pem")
    return written
