"""Secrets from files: every setting that can hold a password also reads ``<NAME>_FILE``.

The Docker and Kubernetes secrets convention: ``DATABASE_URL_FILE=/run/secrets/database_url``
holds the value of ``DATABASE_URL`` (the file's content, trailing newlines
stripped), so the password never sits in the process environment, a compose
file or ``docker inspect``. Setting both forms is an error naming them.

A bottom module (standard library only): worker.settings uses it for the app's
settings and worker.flower_guard for ``FLOWER_BASIC_AUTH``, which Flower reads
itself. Errors are :class:`SecretFileError` (a ``ValueError``); the callers turn
them into their own (``ConfigError``, exit 7). Messages name the variables and
the file's path, never what the file holds.
"""

from __future__ import annotations

from collections.abc import Mapping

# Every setting that can hold a password. DATABASE_URL and the Redis / broker
# URLs carry it as user:password@ (or ?password=), the others are one.
SECRET_VARIABLES = (
    "DATABASE_URL",
    "POSTGRES_PASSWORD",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "FLOWER_BASIC_AUTH",
)
SUFFIX = "_FILE"
# A secret file is a line or a URL: anything bigger is the wrong file.
MAX_BYTES = 65_536


class SecretFileError(ValueError):
    """A ``<NAME>_FILE`` variable cannot be used (both forms set, unreadable file)."""


def read_secret_file(name: str, path: str) -> str:
    """The content of ``path`` for the setting ``name``, trailing newlines stripped."""
    variable = name + SUFFIX
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SecretFileError(f"{variable}: cannot read {path}: {reason}") from None
    if len(data) > MAX_BYTES:
        raise SecretFileError(f"{variable}: {path} is larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"{variable}: {path} is not UTF-8 text") from None
    value = text.rstrip("\r\n")
    if not value.strip():
        raise SecretFileError(f"{variable}: {path} is empty")
    return value


def resolve_secret(environ: Mapping[str, str], name: str) -> str | None:
    """``name``'s value: from ``<name>_FILE`` if that is set, else the variable (None: neither)."""
    path = environ.get(name + SUFFIX, "").strip()
    if not path:
        return environ.get(name)
    if environ.get(name, "").strip():
        raise SecretFileError(
            f"{name} and {name}{SUFFIX} are both set: set only one "
            f"({name}{SUFFIX} names a file holding the value)"
        )
    return read_secret_file(name, path)


def with_secret_files(
    environ: Mapping[str, str], names: tuple[str, ...] = SECRET_VARIABLES
) -> dict[str, str]:
    """A copy of ``environ`` where each ``<NAME>_FILE`` of ``names`` is replaced by ``NAME``."""
    resolved = dict(environ)
    for name in names:
        value = resolve_secret(environ, name)
        resolved.pop(name + SUFFIX, None)
        if value is None:
            resolved.pop(name, None)
        else:
            resolved[name] = value
    return resolved
