"""Rotation of the dev PKI while the stack runs (`streammesh pki rotate`).

Leaves: every leaf in the folder is issued again with the same identity and names, a new key,
a new serial and a new validity; running services take it up without a restart (servers at
their next TLS handshake, mesh clients within their reload interval: streammesh.mesh.tls_reload).

The CA, with an overlap during which every party trusts both CAs:
1. `begin_ca_rotation`: a new CA; `ca.pem` becomes the bundle old + new and the new key signs
   from now on. Once every party reloaded the bundle (the caller waits for that),
2. `rotate_leaves` issues every leaf under the new CA: a party that has the bundle trusts old
   and new leaves alike. Once every party reloaded its new leaf,
3. `finish_ca_rotation` drops the old CA from the bundle (refused while a leaf of the folder
   still chains to it).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from streammesh.mesh.pki import (
    CA_FILE,
    DEFAULT_LEAF_LIFETIME,
    ca_bundle,
    issue_leaf,
    new_ca,
    signing_ca,
    write_ca,
)

__all__ = [
    "CaRotationError",
    "IssuedLeaf",
    "begin_ca_rotation",
    "finish_ca_rotation",
    "leaf_names",
    "renew_due",
    "rotate_leaves",
]


class CaRotationError(RuntimeError):
    """A CA rotation step asked for out of order; the message says what to do."""


@dataclass(frozen=True)
class IssuedLeaf:
    """One leaf re-issued by `rotate_leaves`."""

    name: str
    serial: int
    not_after: dt.datetime


def leaf_names(directory: Path) -> list[str]:
    """The leaves of the folder: every `<name>.pem` with its `<name>-key.pem`, the CA aside."""
    return sorted(
        path.stem
        for path in directory.glob("*.pem")
        if path.name != CA_FILE
        and not path.name.endswith("-key.pem")
        and (directory / f"{path.stem}-key.pem").exists()
    )


def _reissue(directory: Path, name: str, lifetime: dt.timedelta) -> x509.Certificate:
    old = x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())
    sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise ValueError(f"{name}.pem has {len(uris)} URI SANs; it is not a leaf of this PKI")
    usages = old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    return issue_leaf(
        directory,
        file_name=name,
        spiffe_id=uris[0],
        dns_names=sans.get_values_for_type(x509.DNSName),
        server=ExtendedKeyUsageOID.SERVER_AUTH in usages,
        lifetime=lifetime,
    )


def rotate_leaves(
    directory: Path, *, lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME
) -> list[IssuedLeaf]:
    """Issue every leaf of `directory` again under the signing CA, valid for `lifetime`."""
    issued = []
    for name in leaf_names(directory):
        cert = _reissue(directory, name, lifetime)
        issued.append(IssuedLeaf(name, cert.serial_number, cert.not_valid_after_utc))
    return issued


def renew_due(directory: Path, *, lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME) -> list[str]:
    """Issue again each leaf with less than half of `lifetime` left (or expired); their
    names. `streammesh up` calls it, so that a stack started again is never refused for an
    old certificate."""
    now = dt.datetime.now(dt.UTC)
    renewed = []
    for name in leaf_names(directory):
        cert = x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())
        if cert.not_valid_after_utc - now < lifetime / 2:
            _reissue(directory, name, lifetime)
            renewed.append(f"{name}.pem")
    return renewed


def begin_ca_rotation(directory: Path, *, trust_domain: str) -> x509.Certificate:
    """Make a new CA, trusted beside the old one (`ca.pem` holds both) and signing from now
    on; returns it. Refused while an earlier rotation's overlap is still open."""
    bundle = ca_bundle(directory)
    if len(bundle) > 1:
        raise CaRotationError(
            f"{directory / CA_FILE} already holds {len(bundle)} CAs: a CA rotation is under way; "
            "finish it first with `streammesh pki rotate --ca --finish`"
        )
    cert, key = new_ca(trust_domain)
    write_ca(directory, [*bundle, cert], key)
    return cert


def finish_ca_rotation(directory: Path) -> x509.Certificate:
    """End the overlap: `ca.pem` keeps only the signing CA, which is returned. Refused while a
    leaf of the folder was issued by another CA (run `streammesh pki rotate` first)."""
    cert, key = signing_ca(directory)
    stale = []
    for name in leaf_names(directory):
        leaf = x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())
        try:
            leaf.verify_directly_issued_by(cert)
        except (ValueError, TypeError, InvalidSignature):
            stale.append(name)
    if stale:
        raise CaRotationError(
            f"{', '.join(stale)} still chain to the old CA; re-issue them with "
            "`streammesh pki rotate` before dropping it"
        )
    write_ca(directory, [cert], key)
    return cert
