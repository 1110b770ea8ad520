"""Start-up failures that an operator causes, and the one way every service's `main()` runs.

A wrong setting, a missing or unreadable file, a dependency that cannot be reached, a secret key
that does not fit the database: the operator needs to read what is wrong and what to do, in one
line, and the supervisor needs a non-zero exit status, not a traceback. The start-up code raises
`StartupError` for exactly these cases (`reaching` turns connection failures into one);
`run_service` prints its message as one log line and exits with its status. Anything else is a
bug and keeps its traceback.

Exit statuses (sysexits.h): 78 (EX_CONFIG) when a setting, file, key or credential is wrong, so
a restart alone will not help; 69 (EX_UNAVAILABLE) when a dependency is unreachable, which a
restart may outlive.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.exceptions
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError

from streammesh.mesh.logs import configure_logging
from streammesh.mesh.pki import TlsMaterial
from streammesh.mesh.settings import ServiceSettings
from streammesh.mesh.tracing import configure_tracing, shutdown_tracing

__all__ = [
    "EXIT_CONFIG",
    "EXIT_UNAVAILABLE",
    "StartupError",
    "event_loop_factory",
    "listen_problem",
    "load_tls",
    "reaching",
    "redact_url",
    "run_service",
    "settings_problem",
]

log = logging.getLogger(__name__)

EXIT_CONFIG = 78
"""A setting, a file or a key is wrong: restarting alone will not help."""
EXIT_UNAVAILABLE = 69
"""A dependency (Postgres, Redis) could not be reached: a later restart may succeed."""

_S = TypeVar("_S", bound=ServiceSettings)

# Connection-level refusals from Postgres: unknown role or database, wrong password, pg_hba, no
# right to create the schema, the server still starting or out of connection slots.
_POSTGRES_REFUSALS = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InsufficientPrivilegeError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
)
# Refusals that mean the URL's credentials, database or rights are wrong: restarting won't help.
_WRONG_CREDENTIALS = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InsufficientPrivilegeError,
    redis.exceptions.AuthenticationError,
    redis.exceptions.NoPermissionError,
)
_FILE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)
_REDIS_REFUSALS = (
    redis.exceptions.ConnectionError,  # also AuthenticationError
    redis.exceptions.TimeoutError,
    redis.exceptions.NoPermissionError,
)


class StartupError(Exception):
    """A start-up failure the operator can fix; the message says what is wrong and the ways out,
    on one line."""

    def __init__(self, message: str, *, exit_code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def redact_url(url: str) -> str:
    """`url` without its password, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _refusal(error: BaseException) -> BaseException | None:
    """The connection failure behind `error` (SQLAlchemy wraps the driver's), if it is one."""
    seen: BaseException | None = error
    for _ in range(5):  # bounded: the chains are short
        if seen is None:
            return None
        if isinstance(seen, (*_POSTGRES_REFUSALS, *_REDIS_REFUSALS)):
            return seen
        # Sockets (refused, unreachable, unknown host, timed out), not files.
        if isinstance(seen, OSError) and not isinstance(seen, _FILE_ERRORS):
            return seen
        seen = seen.orig if isinstance(seen, DBAPIError) else seen.__cause__
    return None


@contextmanager
def reaching(what: str, url: str) -> Iterator[None]:
    """Within: a failure to connect to `what` (for example "Postgres") at `url` becomes a
    StartupError naming it (EX_UNAVAILABLE; EX_CONFIG when the server refused the URL's
    credentials, database or rights); every other error passes unchanged."""
    try:
        yield
    except (OSError, DBAPIError, *_POSTGRES_REFUSALS, *_REDIS_REFUSALS) as error:
        cause = _refusal(error)
        if cause is None:
            raise
        reason = " ".join(str(cause).split()).rstrip(".") or type(cause).__name__
        if isinstance(cause, _WRONG_CREDENTIALS):
            raise StartupError(
                f"{what} at {redact_url(url)} refused us: {reason}; check the user, password "
                "and database in the URL setting, and the rights of that user",
                exit_code=EXIT_CONFIG,
            ) from error
        raise StartupError(
            f"cannot reach {what} at {redact_url(url)}: {reason}; check that it is running and "
            "that the URL setting points at it",
            exit_code=EXIT_UNAVAILABLE,
        ) from error


def load_tls(tls_dir: Path, name: str) -> TlsMaterial:
    """`name`'s TLS material from `tls_dir`; missing or unreadable files are a StartupError."""
    try:
        return TlsMaterial.load(tls_dir, name)
    except OSError as error:
        raise StartupError(str(error)) from error


def listen_problem(host: str, port: int, tls_dir: Path) -> str:
    """Why gRPC could not listen on `host:port` (it says only "Failed to bind"): the address
    (in use, not local) when a plain socket cannot bind it either, else the TLS material."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            return f"cannot listen on {host}:{port}: {error.strerror or error}"
    return (
        f"cannot listen on {host}:{port} with the TLS material in {tls_dir}: gRPC refused it "
        "(a certificate and key that do not match, or not PEM?); `streammesh pki init --force` "
        "makes a new dev PKI"
    )


def settings_problem(error: ValidationError, env_prefix: str) -> str:
    """One line naming each refused setting by its environment variable (values are left
    out: they may be secrets)."""
    problems = []
    for detail in error.errors():
        field = ".".join(str(part) for part in detail["loc"]) or "settings"
        problems.append(f"{env_prefix}{field.upper()}: {detail['msg']}")
    return "invalid settings: " + "; ".join(problems)


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for the `event_loop` setting; None is asyncio's default loop."""
    if name == "uvloop":
        import uvloop  # only imported when chosen

        return uvloop.new_event_loop
    return None


def run_service(
    service: str, settings_type: type[_S], serve: Callable[[_S], Coroutine[Any, Any, None]]
) -> None:
    """The body of a service's `main()`: build the settings, set up logging, serve.

    A StartupError ends the process with its message as one CRITICAL log line and its exit
    status; invalid settings end it with one line on stderr (logging is not set up yet: its
    settings are among those refused) and EX_CONFIG; Ctrl-C during start-up ends it quietly.
    """
    try:
        settings = settings_type()
    except ValidationError as error:
        prefix = str(settings_type.model_config.get("env_prefix", ""))
        sys.stderr.write(f"{service}: {settings_problem(error, prefix)}\n")
        raise SystemExit(EXIT_CONFIG) from None
    configure_logging(service, settings.log_level, json_lines=settings.log_json)
    try:
        try:
            configure_tracing(settings.tracing(), service)
        except OSError as error:
            raise StartupError(f"cannot write traces to {settings.tracing_file}: {error}") from None
        with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
            runner.run(serve(settings))
    except StartupError as error:
        log.critical("%s", error)
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt:  # before the signal handlers of the drain were installed
        raise SystemExit(130) from None
    finally:
        shutdown_tracing()  # export the spans still buffered
