"""The dev PKI's rotation steps on files (no stack): leaves re-issued with the same identity, the CA
rotation's order enforced, renewal at `up`, and `streammesh pki rotate`'s refusals."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from streammesh.cli.main import main
from streammesh.mesh.pki import CA_FILE, ca_bundle, ca_key_dir, init_pki
from streammesh.mesh.pki_rotation import (
    CaRotationError,
    begin_ca_rotation,
    finish_ca_rotation,
    leaf_names,
    renew_due,
    rotate_leaves,
)
from tests.conftest import TRUST_DOMAIN

LEAVES = ["admin", "auth", "gateway", "ingest", "processor", "storage"]


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    init_pki(directory, trust_domain=TRUST_DOMAIN, leaf_lifetime=dt.timedelta(hours=1))
    return directory


def cert(pki: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki / f"{name}.pem").read_bytes())


def shape(certificate: x509.Certificate) -> tuple[object, ...]:
    """What a re-issued leaf keeps: subject, SANs, key usages."""
    extensions = certificate.extensions
    sans = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    usages = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    return certificate.subject, sorted(map(str, sans)), sorted(u.dotted_string for u in usages)


def test_rotated_leaves_keep_their_identity_with_a_new_key_serial_and_lifetime(pki: Path) -> None:
    assert leaf_names(pki) == LEAVES
    before = {name: cert(pki, name) for name in LEAVES}
    issued = rotate_leaves(pki, lifetime=dt.timedelta(minutes=7))
    assert [leaf.name for leaf in issued] == LEAVES
    for name in LEAVES:
        after = cert(pki, name)
        assert shape(after) == shape(before[name])
        assert after.serial_number != before[name].serial_number
        assert after.public_key() != before[name].public_key()
        assert after.not_valid_after_utc - after.not_valid_before_utc == dt.timedelta(minutes=12)
        after.verify_directly_issued_by(ca_bundle(pki)[0])
        assert (pki / f"{name}-key.pem").stat().st_mode & 0o777 == 0o600
    usages = cert(pki, "admin").extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH not in usages  # an operator stays a client only
    assert not [path for path in pki.iterdir() if path.name.startswith(".")]  # no temp files left


def test_ca_rotation_steps_in_order(pki: Path) -> None:
    (old_ca,) = ca_bundle(pki)
    new_ca = begin_ca_rotation(pki, trust_domain=TRUST_DOMAIN)
    assert ca_bundle(pki) == [old_ca, new_ca]
    with pytest.raises(CaRotationError, match="a CA rotation is under way"):
        begin_ca_rotation(pki, trust_domain=TRUST_DOMAIN)
    with pytest.raises(CaRotationError, match="still chain to the old CA"):
        finish_ca_rotation(pki)
    assert ca_bundle(pki) == [old_ca, new_ca]  # a refused step changes nothing
    rotate_leaves(pki)
    for name in LEAVES:
        cert(pki, name).verify_directly_issued_by(new_ca)
    assert finish_ca_rotation(pki) == new_ca
    assert ca_bundle(pki) == [new_ca]
    assert (ca_key_dir(pki) / "ca-key.pem").stat().st_mode & 0o777 == 0o600


def test_renewal_takes_only_leaves_past_half_their_lifetime(pki: Path) -> None:
    before = {name: cert(pki, name).serial_number for name in LEAVES}
    assert renew_due(pki, lifetime=dt.timedelta(hours=1)) == []  # an hour left of an hour
    assert renew_due(pki, lifetime=dt.timedelta(hours=3)) == [f"{n}.pem" for n in LEAVES]
    assert all(cert(pki, name).serial_number != before[name] for name in LEAVES)


def test_rotate_command_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMMESH_STATE_DIR", str(tmp_path / "state"))
    assert main(["pki", "rotate"]) == 1
    assert "no PKI in" in capsys.readouterr().err
    monkeypatch.setenv("STREAMMESH_LEAF_LIFETIME_SECONDS", "600")
    assert main(["pki", "init"]) == 0
    pki = tmp_path / "state" / "pki"
    lifetime = cert(pki, "storage").not_valid_after_utc - cert(pki, "storage").not_valid_before_utc
    assert lifetime == dt.timedelta(minutes=15)  # 10 minutes, 5 of them backdated
    assert main(["pki", "rotate", "--finish"]) == 1
    assert "streammesh pki rotate --ca --finish" in capsys.readouterr().err
    assert main(["pki", "rotate", "--ca", "--wait", "0"]) == 0
    assert "then, to drop the old CA" in capsys.readouterr().out
    assert main(["pki", "rotate", "--ca", "--wait", "0"]) == 1
    assert "finish it first" in capsys.readouterr().err
    assert main(["pki", "rotate", "--ca", "--finish", "--wait", "0"]) == 0
    assert len(x509.load_pem_x509_certificates((pki / CA_FILE).read_bytes())) == 1
