"""Throwaway certificate authorities for TLS tests, made with the `cryptography` package.

Each test makes its own CA and signs a server certificate (for 127.0.0.1 and
localhost, or for names of its choosing) and a client certificate with it;
nothing is kept after the test's temporary folder goes.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("127.0.0.1", "localhost")
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)  # PostgreSQL refuses a key others can read


class TestCA:
    """A certificate authority of one test: ``ca.pem`` plus what it signs."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, directory: Path, name: str = "dnd test CA") -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, stem: str, *, names: tuple[str, ...] = LOCAL_NAMES, client: bool = False
    ) -> CertFiles:
        """A certificate for ``names`` (DNS names or IP addresses), signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        files = CertFiles(self.dir / f"{stem}.crt", self.dir / f"{stem}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, files.key)
        return files


def _redis_binaries() -> list[str]:
    """redis-server binaries to try: the one on PATH may be built without TLS."""
    found = [
        shutil.which("redis-server") or "",
        "/usr/bin/redis-server",
        "/usr/local/bin/redis-server",
    ]
    return [b for i, b in enumerate(found) if b and os.path.exists(b) and b not in found[:i]]


class TlsRedis:
    """`redis-server` that speaks only TLS, with a certificate of ``ca``, on a free port.

    ``auth_clients``: Redis's --tls-auth-clients (``yes``: a client certificate
    of the CA is required; ``optional``; ``no``).
    """

    def __init__(self, workdir: Path, ca: TestCA, server: CertFiles, auth_clients: str = "yes"):
        from tests.servers import free_port

        self.port = free_port()
        self.ca = ca
        self.dir = workdir / f"redis-tls-{self.port}"
        self.dir.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None
        tried = []
        for binary in _redis_binaries():
            log = self.dir / "redis.log"
            with log.open("wb") as out:
                self.proc = subprocess.Popen(
                    [
                        binary, "--bind", "127.0.0.1", "--port", "0",
                        "--tls-port", str(self.port), "--tls-cert-file", str(server.cert),
                        "--tls-key-file", str(server.key), "--tls-ca-cert-file", str(ca.path),
                        "--tls-auth-clients", auth_clients, "--dir", str(self.dir),
                        "--save", "", "--appendonly", "no",
                    ],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            if self._wait_ready():
                return
            tried.append(f"{binary}: {log.read_text(errors='replace')[-300:]}")
        raise AssertionError("no redis-server here starts with TLS:\n" + "\n".join(tried))

    def _wait_ready(self, timeout: float = 10) -> bool:
        import redis

        assert self.proc is not None
        client = redis.Redis.from_url(self.url(0, client_cert=True), socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    client.ping()
                    return True
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        return False

    def url(
        self, db: int, *, ca: Path | None = None, host: str = "127.0.0.1", client_cert: bool = True,
        extra: str = "",
    ) -> str:  # fmt: skip
        """A rediss:// URL checking the server against ``ca`` (default: the right one)."""
        query = f"ssl_ca_certs={ca or self.ca.path}"
        if client_cert:
            client = self.ca.dir / "client.crt"
            if not client.exists():
                self.ca.issue("client", names=("dnd-worker",), client=True)
            query += f"&ssl_certfile={client}&ssl_keyfile={self.ca.dir / 'client.key'}"
        return f"rediss://{host}:{self.port}/{db}?{query}{'&' + extra if extra else ''}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
