"""TLS of every connection: certificate checks on by default, a warning when one is turned off.

Two things, both about the URLs of the settings (a bottom module: it reads
URLs, it opens nothing):

- :func:`with_cert_check`: a ``rediss://`` URL without ``ssl_cert_reqs``
  gets ``ssl_cert_reqs=required``. redis-py already checks by default, but
  kombu (the Celery broker) then connects with ``CERT_NONE`` and only warns
  (Celery #5371), and Celery's Redis result backend refuses such a URL
  outright. With it, the three Redis connections behave the same: the server's
  certificate is checked against ``ssl_ca_certs`` (or the system's CAs), and
  its name against the URL's host.
- :func:`unchecked_tls`: the settings that turn a check off (``rediss://`` with
  ``ssl_cert_reqs=none`` or ``ssl_check_hostname=false``; PostgreSQL with an
  ``sslmode`` below ``verify-ca`` on a host that is not this machine), each
  with what it turns off, for the one warning workers, beat and the CLI log
  at start.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit

from worker.settings import Settings

_OFF = frozenset({"none", "cert_none"})
_FALSE = frozenset({"false", "0", "no", "off"})
_LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})
# libpq's modes that do not check the server's certificate against a CA.
_UNCHECKED_SSLMODES = ("disable", "allow", "prefer", "require")


def with_cert_check(url: str) -> str:
    """``url``, with ``ssl_cert_reqs=required`` added if it is ``rediss://`` without one."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return url
    if any(key == "ssl_cert_reqs" for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return url
    query = f"{parts.query}&ssl_cert_reqs=required" if parts.query else "ssl_cert_reqs=required"
    return urlunsplit(parts._replace(query=query))


def redis_unchecked(url: str) -> str | None:
    """What a ``rediss://`` URL turns off (None: every check is on, or no TLS at all)."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {key: value.strip().lower() for key, value in parse_qsl(parts.query)}
    if query.get("ssl_cert_reqs") in _OFF:
        return "ssl_cert_reqs=none: the server's certificate is not checked"
    if query.get("ssl_check_hostname") in _FALSE:
        return "ssl_check_hostname=false: the server's name is not checked"
    return None


def postgres_unchecked(url: str) -> str | None:
    """What a PostgreSQL URL's ``sslmode`` leaves unchecked, on a host that is not local."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    host = query.get("host", parts.hostname or "")
    if host.startswith("/") or host.lower() in _LOCAL_HOSTS:
        return None
    # Without sslmode, libpq uses PGSSLMODE, else `prefer`.
    sslmode = query.get("sslmode", "prefer (the default)")
    if not sslmode.startswith(_UNCHECKED_SSLMODES):
        return None
    return (
        f"sslmode={sslmode} on {host}: the server's certificate is not checked "
        "(use sslmode=verify-full with sslrootcert=...)"
    )


def unchecked_tls(settings: Settings) -> list[tuple[str, str]]:
    """Each setting that turns a TLS check off, with what it turns off."""
    found = []
    for name, url in (
        ("REDIS_URL", settings.redis_url),
        ("CELERY_BROKER_URL", settings.broker_url),
        ("CELERY_RESULT_BACKEND", settings.result_backend),
    ):
        problem = redis_unchecked(url)
        if problem:
            found.append((name, problem))
    problem = postgres_unchecked(settings.database_url)
    if problem:
        found.append((settings.database_url_setting, problem))
    return found


def tls_warning(settings: Settings) -> str | None:
    """The one line to log at start when a check is off (None: nothing to say)."""
    found = unchecked_tls(settings)
    if not found:
        return None
    return "TLS check off: " + "; ".join(f"{name}: {what}" for name, what in found)
