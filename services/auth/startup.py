"""Auth's start-up failures that an operator causes, each as one line saying the ways out.

The secret key file seals the TOTP secrets and the signing keys and keys the recovery-code
digests, all kept in the database: the two belong together. Starting with a key file that did
not seal the database (a new state folder, a lost file) cannot work; the message says so and
what to do, instead of a DecryptionError traceback.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.auth.crypto import DecryptionError, SecretBox, WrongKeyError
from services.auth.settings import AuthSettings
from streammesh.mesh.startup import StartupError

__all__ = ["load_secret_box", "sealed_with_this_key"]

_LOST = "that loses every user, TOTP secret, recovery code, session and signing key"


def load_secret_box(path: Path) -> SecretBox:
    """The secret key file's box; a missing, empty, undecodable or group/world-readable file is
    a StartupError."""
    try:
        return SecretBox.from_file(path)
    except FileNotFoundError as error:  # its message names the file and how to make one
        raise StartupError(str(error)) from error
    except (OSError, ValueError, binascii.Error) as error:
        raise StartupError(f"secret key file {path} cannot be used: {error}") from error


@contextmanager
def sealed_with_this_key(settings: AuthSettings) -> Iterator[None]:
    """Within: a stored secret that the secret key file cannot open becomes a StartupError."""
    schema, path = settings.db_schema, settings.secret_key_file
    try:
        yield
    except WrongKeyError as error:
        raise StartupError(
            f"the secrets in Postgres schema {schema!r} were sealed under secret key "
            f"{error.sealed_under}, but {path} holds key {error.holds}: restore the secret key "
            "file that was used with this database (back it up with the database) and point "
            "STREAMMESH_AUTH_SECRET_KEY_FILE at it (with `streammesh up`: "
            "<state folder>/secrets/auth-secret-key); or start with a fresh schema "
            f"(another STREAMMESH_AUTH_DB_SCHEMA, or DROP SCHEMA {schema} CASCADE); {_LOST}"
        ) from error
    except DecryptionError as error:
        raise StartupError(
            f"a secret in Postgres schema {schema!r} does not open with {path} ({error}): the "
            "database was altered, or restored apart from its secret key file; restore both "
            f"from the same backup, or start with a fresh schema; {_LOST}"
        ) from error
