"""What signing task messages costs: CPU per message to sign and to verify, and message size.

    python bench/signing.py [--messages N] [--json]

Builds the body of a real task message (a `backup_batch` of BACKUP_BATCH_SESSIONS
session IDs, as Celery's protocol 2 sends it), then signs and verifies it N times
with Celery's `auth` serializer (RSA 2048, SHA-256, the key made here) and prints
the median and p99 CPU time of each, and the body's size signed and not. No
server needed. Exit 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=200, help="session IDs in the body")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer
    from kombu.serialization import dumps

    from tests.e2e.security_helpers import signing_identity

    with tempfile.TemporaryDirectory() as folder:
        key_path, cert_path = signing_identity(Path(folder), "bench")
        key = PrivateKey(key_path.read_text())
        cert = Certificate(cert_path.read_text())
        store = FSCertStore(str(cert_path))
    serializer = SecureSerializer(key, cert, store, digest="sha256", serializer="json")
    ids = [str(uuid.uuid4()) for _ in range(args.sessions)]
    body: tuple[Any, ...] = (
        [],
        {"run_id": str(uuid.uuid4()), "shard": 0, "batch_no": 1, "session_ids": ids},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    )
    plain = dumps(body, serializer="json")[2]  # type: ignore[no-untyped-call]
    sign_s, verify_s = [], []
    signed = b""
    for _ in range(args.messages):
        start = time.process_time()
        signed = serializer.serialize(body)
        sign_s.append(time.process_time() - start)
        start = time.process_time()
        serializer.deserialize(signed)
        verify_s.append(time.process_time() - start)
    figures = {
        "messages": args.messages,
        "session_ids_in_body": args.sessions,
        "sign_ms_median": round(statistics.median(sign_s) * 1000, 3),
        "sign_ms_p99": round(sorted(sign_s)[int(len(sign_s) * 0.99) - 1] * 1000, 3),
        "verify_ms_median": round(statistics.median(verify_s) * 1000, 3),
        "verify_ms_p99": round(sorted(verify_s)[int(len(verify_s) * 0.99) - 1] * 1000, 3),
        "body_bytes_plain": len(plain.encode() if isinstance(plain, str) else plain),
        "body_bytes_signed": len(signed),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:22} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
