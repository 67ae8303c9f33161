"""Helpers of the security tests: the blocks of docs/security.md, a Redis 7 server.

The least-privilege test runs the SQL and ACL blocks of docs/security.md
themselves (tagged ``<!-- test: NAME -->``), so the documentation cannot drift
from what was tested.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.processes import REPO

SECURITY_DOC = REPO / "docs" / "security.md"


def doc_block(tag: str, replacements: dict[str, str] | None = None) -> str:
    """The fenced block that follows ``<!-- test: tag -->`` in docs/security.md."""
    text = SECURITY_DOC.read_text()
    match = re.search(rf"<!-- test: {re.escape(tag)} -->\n```[a-z]*\n(.*?)\n```", text, re.S)
    assert match, f"docs/security.md has no block tagged {tag!r}"
    block = match.group(1)
    for old, new in (replacements or {}).items():
        block = block.replace(old, new)
    return block


def sql_statements(block: str) -> list[str]:
    """The statements of a SQL block (none of ours holds a ';' inside a string)."""
    lines = [line for line in block.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def redis_7_binary() -> str:
    """A redis-server of version 7 or later (ACL selectors like %R~ are Redis 7)."""
    seen = []
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]:
        candidate = Path(folder) / "redis-server"
        if not candidate.is_file() or str(candidate) in seen:
            continue
        seen.append(str(candidate))
        out = subprocess.run(
            [str(candidate), "--version"], capture_output=True, text=True, check=False
        ).stdout
        version = re.search(r"v=(\d+)\.", out)
        if version and int(version.group(1)) >= 7:
            return str(candidate)
    found = shutil.which("redis-server")
    raise AssertionError(f"no redis-server 7 or later on this machine (found {seen or found})")


def signing_identity(folder: Path, name: str) -> tuple[Path, Path]:
    """A private key and a self-signed certificate for signing task messages: (key, cert)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path
