"""Development PKI: one CA, one certificate per service, one per operator.

Leaf certificates are short-lived (`DEFAULT_LEAF_LIFETIME`, 24 h; `streammesh pki rotate`
re-issues them while the stack runs: streammesh.mesh.pki_rotation). `ca.pem` is a bundle: one
CA, or two during a CA rotation's overlap; leaves are signed by the one whose key is in the CA
folder. Every file is written atomically (a new file, then a rename), so a process that reads
the material while it is rotated reads either the old file or the new one, never half of one.

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
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from streammesh.mesh.identity import operator_id, service_id

__all__ = [
    "DEFAULT_LEAF_LIFETIME",
    "SERVICE_NAMES",
    "TlsMaterial",
    "init_pki",
    "issue_leaf",
    "signing_ca",
    "write_atomically",
]

SERVICE_NAMES = ("gateway", "auth", "ingest", "processor", "storage")
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
_CA_DAYS = 3650
DEFAULT_LEAF_LIFETIME = dt.timedelta(hours=24)
"""How long a leaf certificate is valid unless the caller says otherwise."""
_BACKDATE = dt.timedelta(minutes=5)
"""Validity starts this long before issue, for clocks a little behind ours."""


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


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write `data` to a new file beside `path`, flush it to disk, then rename it over `path`:
    a reader sees the old content or the new, never a part (POSIX rename is atomic)."""
    # mkstemp: a new file (O_EXCL, 0600 until the chmod below), never one that exists or a
    # symlink someone placed under a predictable name.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)  # O_CREAT's mode is masked by the umask
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_private(path: Path, data: bytes) -> None:
    write_atomically(path, data, mode=0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_ca(trust_domain: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed CA certificate and its key (not written anywhere)."""
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
    return cert, key


def write_ca(
    directory: Path, bundle: Iterable[x509.Certificate], key: ec.EllipticCurvePrivateKey
) -> None:
    """Write the trust bundle `ca.pem` first, then the signing key: a leaf is never signed by a
    CA that the bundle does not hold yet."""
    pem = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in bundle)
    write_atomically(directory / CA_FILE, pem)
    key_dir = ca_key_dir(directory)
    key_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    _write_private(key_dir / CA_KEY_FILE, _key_pem(key))


def _create_ca(directory: Path, trust_domain: str) -> None:
    cert, key = new_ca(trust_domain)
    write_ca(directory, [cert], key)


def ca_bundle(directory: Path) -> list[x509.Certificate]:
    """The CA certificates `ca.pem` holds (two during a CA rotation's overlap)."""
    return x509.load_pem_x509_certificates((directory / CA_FILE).read_bytes())


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) == key.public_key().public_bytes(serialization.Encoding.DER, spki)


def signing_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA that issues leaves: the key in the CA folder and its certificate in the bundle."""
    ca_key = serialization.load_pem_private_key(
        (ca_key_dir(directory) / CA_KEY_FILE).read_bytes(), None
    )
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the dev CA key must be an EC key")
    for cert in ca_bundle(directory):
        if _same_key(cert, ca_key):
            return cert, ca_key
    raise ValueError(f"no certificate in {directory / CA_FILE} matches the CA key")


def issue_leaf(
    directory: Path,
    *,
    file_name: str,
    spiffe_id: str,
    dns_names: Iterable[str] = (),
    server: bool = True,
    lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME,
) -> x509.Certificate:
    """Issue `<file_name>.pem` / `<file_name>-key.pem` signed by the CA in `directory`, valid
    for `lifetime` from now; returns the certificate. The key is written first: a reader that
    comes between the two renames sees a key and certificate that do not match, and keeps
    what it had (streammesh.mesh.tls_reload)."""
    ca_cert, ca_key = signing_ca(directory)
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
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(directory / f"{file_name}-key.pem", _key_pem(key))
    write_atomically(directory / f"{file_name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    return cert


def init_pki(
    directory: Path,
    *,
    trust_domain: str,
    services: Iterable[str] = SERVICE_NAMES,
    operators: Iterable[str] = ("admin",),
    force: bool = False,
    leaf_lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME,
) -> list[str]:
    """Create the CA (unless present) and every missing certificate, valid for
    `leaf_lifetime`; return what was written.

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
                lifetime=leaf_lifetime,
            )
            written.append(f"{name}.pem")
    for name in operators:
        if force or not (directory / f"{name}.pem").exists():
            issue_leaf(
                directory,
                file_name=name,
                spiffe_id=operator_id(trust_domain, name),
                server=False,
                lifetime=leaf_lifetime,
            )
            written.append(f"{name}.pem")
    return written
