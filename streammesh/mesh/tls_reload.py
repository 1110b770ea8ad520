"""TLS material that changes under a running process (`streammesh pki rotate`).

The PKI writes each file atomically (a new file, then a rename), so a file is always whole; a
certificate and its key are two files, though, so a reader may come between their renames. A
snapshot is therefore taken only when the files did not change while they were read and the
key matches the certificate; otherwise the reader keeps what it has and looks again later.

Servers: `ServerCredentialsReloader` is the certificate-config fetcher of gRPC's
`dynamic_ssl_server_credentials`, which gRPC core calls before each new TLS handshake (on one
of its own threads), so a new connection gets the new certificate and CA bundle at once and
connections already open keep theirs. Its cost per handshake is three stat calls.
Plain `ssl` listeners (the gateway's JWKS over HTTPS): `ReloadingSslContext`, whose SNI callback
(which OpenSSL runs at each ClientHello, with or without a server name) hands the handshake a
context with the current files.
Clients: gRPC Python cannot reload a channel's credentials (grpc/grpc#41779); the mesh client
polls the same snapshot and swaps channels (streammesh.mesh.channel_reload).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from streammesh.mesh.pki import CA_FILE, TlsMaterial

__all__ = [
    "MaterialSnapshot",
    "ReloadingSslContext",
    "ServerCredentialsReloader",
    "file_stamp",
    "read_snapshot",
]

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int, int], ...]
"""(device, inode, mtime in ns, size) of each file: a rename gives a new inode."""


def file_stamp(paths: Sequence[Path]) -> Stamp:
    """The stamp of `paths` now; FileNotFoundError when one is missing."""
    stamps = []
    for path in paths:
        status = os.stat(path)
        stamps.append((status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size))
    return tuple(stamps)


@dataclass(frozen=True)
class MaterialSnapshot:
    """The PEM bytes of one consistent read of the files, and their stamp."""

    stamp: Stamp
    ca: bytes
    certificate_chain: bytes | None
    private_key: bytes | None


def _public_der(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes")  # noqa: B009 (every key type has it; typed apart)
    der: bytes = public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def key_matches(certificate_chain: bytes, private_key: bytes) -> bool:
    """Whether the first certificate of the chain is the public half of the key."""
    cert = x509.load_pem_x509_certificate(certificate_chain)
    key = serialization.load_pem_private_key(private_key, None)
    return _public_der(cert.public_key()) == _public_der(key.public_key())


def read_snapshot(
    ca_file: Path, certificate_file: Path | None = None, key_file: Path | None = None
) -> MaterialSnapshot | None:
    """The files as they are now, or None while a rotation is between its renames (read
    again later). FileNotFoundError when one is missing; ValueError when one is not PEM."""
    paths = [ca_file, *(p for p in (certificate_file, key_file) if p is not None)]
    before = file_stamp(paths)
    ca = ca_file.read_bytes()
    chain = None if certificate_file is None else certificate_file.read_bytes()
    key = None if key_file is None else key_file.read_bytes()
    if file_stamp(paths) != before:
        return None
    x509.load_pem_x509_certificates(ca)  # a bundle that does not parse is refused here
    if chain is not None and key is not None and not key_matches(chain, key):
        return None
    return MaterialSnapshot(before, ca, chain, key)


class ServerCredentialsReloader:
    """Server credentials for `identity` that follow its files in `tls_dir`. `on_change` is
    told of each new material taken (the certificate-expiry gauge follows it)."""

    def __init__(
        self,
        tls_dir: Path,
        identity: str,
        *,
        require_client_cert: bool,
        on_change: Callable[[TlsMaterial], None] = lambda material: None,
    ) -> None:
        self._files = (
            tls_dir / CA_FILE,
            tls_dir / f"{identity}.pem",
            tls_dir / f"{identity}-key.pem",
        )
        self._identity = identity
        self._require_client_cert = require_client_cert
        self._on_change = on_change
        self._lock = threading.Lock()
        snapshot = read_snapshot(*self._files)
        if snapshot is None:  # a rotation is between its renames right now: wait it out once
            snapshot = read_snapshot(*self._files)
        if snapshot is None:
            raise ValueError(f"{self._files[1]} and {self._files[2]} do not match")
        self._snapshot = snapshot
        self.reloads = 0
        """New materials taken since start."""

    @property
    def material(self) -> TlsMaterial:
        """The material new connections get."""
        return _material(self._snapshot)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for `add_secure_port` that take new material at each new handshake."""
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._snapshot),
            self.fetch,
            require_client_authentication=self._require_client_cert,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-config fetcher: the new configuration when the files changed,
        else None (keep the current one). Never raises: a failure keeps the current material."""
        try:
            with self._lock:
                if file_stamp(self._files) == self._snapshot.stamp:
                    return None
                snapshot = read_snapshot(*self._files)
                if snapshot is None:
                    return None
                self._snapshot = snapshot
                self.reloads += 1
            material = _material(snapshot)
            self._on_change(material)
            log.info("%s: new TLS material for new connections", self._identity)
            return _configuration(snapshot)
        except (OSError, ValueError) as error:
            log.warning("%s: TLS material not reloaded: %s", self._identity, error)
            return None


def _material(snapshot: MaterialSnapshot) -> TlsMaterial:
    return TlsMaterial(
        ca=snapshot.ca,
        certificate_chain=snapshot.certificate_chain or b"",
        private_key=snapshot.private_key or b"",
    )


def _configuration(snapshot: MaterialSnapshot) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(snapshot.private_key, snapshot.certificate_chain)], root_certificates=snapshot.ca
    )


class ReloadingSslContext:
    """The `ssl.SSLContext` of a server whose certificate follows `certificate_file` and
    `key_file`: pass `context` to the listener. `configure` sets up each context made (the
    TLS versions, say)."""

    def __init__(
        self,
        certificate_file: Path,
        key_file: Path,
        configure: Callable[[ssl.SSLContext], None] = lambda context: None,
    ) -> None:
        self._files = (certificate_file, key_file)
        self._configure = configure
        self._stamp = file_stamp(self._files)
        self._current = self._build()
        self.context = self._build()
        """The listening context; each handshake is handed the current one."""
        self.context.sni_callback = self._pick
        self.reloads = 0

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._configure(context)
        # OpenSSL refuses a key that is not the certificate's (a rotation between its renames).
        context.load_cert_chain(*self._files)
        return context

    def _pick(self, connection: ssl.SSLObject | ssl.SSLSocket, *_: object) -> None:
        try:
            stamp = file_stamp(self._files)
            if stamp != self._stamp:
                self._current = self._build()
                self._stamp = stamp
                self.reloads += 1
                log.info("new TLS certificate for new connections (%s)", self._files[0].name)
        except (OSError, ssl.SSLError) as error:
            log.warning("TLS certificate %s not reloaded: %s", self._files[0], error)
        connection.context = self._current
