"""Encryption of secrets at rest (TOTP secrets, signing keys): AES-256-GCM under a key derived
from the service's secret key file.

Each sealed value is a self-describing envelope:

    version (1 byte) | key id (8 bytes) | nonce (12 bytes) | ciphertext + GCM tag (16 bytes)

The associated data binds the envelope to its purpose and row ("totp-active" of user X), so a
ciphertext copied into another row or column fails to open instead of silently becoming that row's
secret. The key id names the key that sealed it, so a later key rotation can hold the old key
next to the new one and re-seal lazily.

The same file also keys HMAC-SHA-256 digests (`digest`) of values that are only ever compared,
such as recovery codes; each purpose gets its own derived key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from enum import StrEnum
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from streammesh.mesh.settings import read_secret_file

__all__ = ["DecryptionError", "MacPurpose", "Purpose", "SecretBox", "WrongKeyError"]

_VERSION = 1
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_BYTES = 1 + _KEY_ID_BYTES
_MIN_MASTER_BYTES = 32
_SALT = b"streammesh-auth/secret-box"


class Purpose(StrEnum):
    """What a sealed value is; part of the associated data, so values cannot swap roles."""

    TOTP_PENDING = "totp-pending"
    TOTP_ACTIVE = "totp-active"
    SIGNING_KEY = "signing-key"


class MacPurpose(StrEnum):
    """What a keyed digest is for; each purpose has its own derived key."""

    RECOVERY_CODE = "recovery-code"


class DecryptionError(Exception):
    """A sealed value could not be opened: wrong secret key file, or tampered/moved ciphertext."""


class WrongKeyError(DecryptionError):
    """The value was sealed under another secret key than the file's (`sealed_under`, `holds`:
    key ids)."""

    def __init__(self, sealed_under: str, holds: str) -> None:
        super().__init__(
            f"sealed under key {sealed_under}, but the secret key file holds key {holds}"
        )
        self.sealed_under = sealed_under
        self.holds = holds


def _derive(master: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=info).derive(master)


class SecretBox:
    """Seals and opens small secrets bound to a purpose and a row id."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) < _MIN_MASTER_BYTES:
            raise ValueError(f"the secret key must have at least {_MIN_MASTER_BYTES} bytes")
        # Derived keys rather than the file's bytes: the same file can later seed other keys
        # (for example an HMAC for refresh tokens) without reusing key material across uses.
        self._aead = AESGCM(_derive(master_key, b"aes-256-gcm at-rest v1", 32))
        # The key id is derived too, so publishing it says nothing about the key itself.
        self._key_id = _derive(master_key, b"key-id v1", _KEY_ID_BYTES)
        self._mac_keys = {
            purpose: _derive(master_key, f"hmac-sha256 {purpose.value} v1".encode(), 32)
            for purpose in MacPurpose
        }

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        """Load the key file the CLI writes (url-safe base64 of 32 random bytes, mode 0600).

        Refuses files other users can read (PermissionError) and files that do not decode.
        """
        try:
            encoded = read_secret_file(path)
        except FileNotFoundError as missing:
            raise FileNotFoundError(
                f"secret key file {path} is missing; create it with `streammesh` (dev) or "
                "provision a mode-0600 file with url-safe base64 of 32 random bytes"
            ) from missing
        try:
            master = base64.urlsafe_b64decode(encoded)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"{path} is not url-safe base64") from error
        return cls(master)

    @property
    def key_id(self) -> str:
        """Hex id of the key, to tell which key sealed a value (never the key itself)."""
        return self._key_id.hex()

    def digest(self, data: bytes, *, purpose: MacPurpose) -> bytes:
        """HMAC-SHA-256 of `data` under the key derived for `purpose`.

        For high-entropy values that are only ever compared (recovery codes): a fast keyed hash
        is enough there, and without the secret key file a stolen table cannot even be tested
        against guesses.
        """
        return hmac.new(self._mac_keys[purpose], data, hashlib.sha256).digest()

    def seal(self, plaintext: bytes, *, purpose: Purpose, row_id: str) -> bytes:
        """Encrypt `plaintext` for `purpose` of row `row_id` with a fresh random nonce."""
        header = bytes([_VERSION]) + self._key_id
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, header + _binding(purpose, row_id))
        return header + nonce + sealed

    def open(self, envelope: bytes, *, purpose: Purpose, row_id: str) -> bytes:
        """Decrypt an envelope sealed for the same `purpose` and `row_id`."""
        if len(envelope) < _HEADER_BYTES + _NONCE_BYTES + _TAG_BYTES or envelope[0] != _VERSION:
            raise DecryptionError("not a sealed value of a known version")
        header = envelope[:_HEADER_BYTES]
        if header[1:] != self._key_id:
            raise WrongKeyError(header[1:].hex(), self.key_id)
        nonce = envelope[_HEADER_BYTES : _HEADER_BYTES + _NONCE_BYTES]
        try:
            return self._aead.decrypt(
                nonce, envelope[_HEADER_BYTES + _NONCE_BYTES :], header + _binding(purpose, row_id)
            )
        except InvalidTag as error:
            raise DecryptionError(f"{purpose} of {row_id} failed authentication") from error


def _binding(purpose: Purpose, row_id: str) -> bytes:
    # Neither purposes nor row ids (UUIDs, key thumbprints) contain NUL, so this is unambiguous.
    return f"streammesh-auth\x00{purpose.value}\x00{row_id}".encode()
