"""A redis-server that speaks TLS only and knows no default user, only an ACL user: the Redis a
security-minded deployment runs, for the sink's, the view's and the job's end-to-end tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from infra.stack import ManagedProcess, free_port, wait_for_port
from tests.e2e.conftest import self_signed

ACL_USER, ACL_PASSWORD = "app", "app s3cret"


def certificates(directory: Path, host_names: str) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signed for `host_names` (an openssl SAN list):
    (ca.pem, server.pem, server.key)."""
    ca, ca_key = self_signed(directory, "test-ca")
    key, csr, cert = (directory / n for n in ("server.key", "server.csr", "server.pem"))
    subprocess.run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=redis",
            "-keyout",
            str(key),
            "-out",
            str(csr),
        ],
        check=True,
        capture_output=True,
    )
    extensions = directory / "san.ext"
    extensions.write_text(f"subjectAltName={host_names}\n")
    subprocess.run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(extensions),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return ca, cert, key


def tls_redis(directory: Path, host_names: str) -> tuple[ManagedProcess, int, Path]:
    """redis-server with TLS only (no plaintext port) and an ACL user `app` allowed the view's
    keys and the commands the sink and the view use, and nothing else."""
    directory.mkdir()
    ca, cert, key = certificates(directory, host_names)
    port = free_port()
    server = ManagedProcess("redis-tls", directory)
    server.start(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
            "--user",
            "default",
            "off",
            "--user",
            ACL_USER,
            "on",
            f">{ACL_PASSWORD}",
            "~t:*",
            "+@read",
            "+@write",
            "+@transaction",
            "+evalsha",
            "+eval",
            "+script",
            "+ping",
            "+select",
            "+info",
        ]
    )
    wait_for_port(port, what="redis-server (TLS)")
    return server, port, ca
