"""Certificates the dev PKI would never issue, made in a test with the PKI's own CA key: the
shapes the identity checks must refuse (two URI SANs, CA:TRUE, expired, not yet valid), and an
identity no policy names."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from streammesh.mesh.pki import CA_FILE, CA_KEY_FILE, TlsMaterial, ca_key_dir

__all__ = ["odd_leaf", "served_certificate"]


def odd_leaf(
    pki_dir: Path,
    uris: Sequence[str],
    *,
    ca: bool = False,
    valid_from: dt.timedelta = dt.timedelta(minutes=-5),
    valid_for: dt.timedelta = dt.timedelta(hours=1),
) -> TlsMaterial:
    """A client certificate signed by the CA of `pki_dir` with these URI SANs, the CA flag as
    given, valid from now + `valid_from` for `valid_for`; returned with the CA and its key."""
    ca_pem = (pki_dir / CA_FILE).read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(
        (ca_key_dir(pki_dir) / CA_KEY_FILE).read_bytes(), None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.now(dt.UTC) + valid_from
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd leaf")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + valid_for)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return TlsMaterial(
        ca=ca_pem,
        certificate_chain=cert.public_bytes(serialization.Encoding.PEM),
        private_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _handshake(
    port: int, ca_file: Path, server_name: str, client: tuple[Path, Path] | None
) -> bytes:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])  # gRPC servers refuse a TLS client that does not offer it
    if client is not None:
        context.load_cert_chain(*client)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def served_certificate(
    port: int, ca_file: Path, *, server_name: str, client: tuple[Path, Path] | None = None
) -> x509.Certificate:
    """The certificate a server on 127.0.0.1:`port` presents to a new connection, verified
    against `ca_file` and `server_name` (with `client`'s certificate and key, for a listener
    that requires one); ssl.SSLError when it does not verify."""
    der = await asyncio.to_thread(_handshake, port, ca_file, server_name, client)
    return x509.load_der_x509_certificate(der)
