"""A certificate authority the tests make, and certificates it signs (with the openssl CLI)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerCertificate:
    ca: Path
    """The CA's certificate (PEM): what a client must trust."""
    cert: Path
    key: Path


def _openssl(*argv: str) -> None:
    subprocess.run(["openssl", *argv], check=True, capture_output=True)


def make_server_certificate(directory: Path, name: str) -> ServerCertificate:
    """A new CA, and a certificate for the DNS name ``name`` signed by it, in ``directory``."""
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, request, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    extensions = directory / "server.ext"
    self_signed = ["-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=nspawn-mcp test CA"]
    _openssl("req", *self_signed, "-keyout", str(ca_key), "-out", str(ca))
    new_key = ["-newkey", "rsa:2048", "-nodes", "-keyout", str(key)]
    _openssl("req", *new_key, "-subj", f"/CN={name}", "-out", str(request))
    extensions.write_text(f"subjectAltName = DNS:{name}\nextendedKeyUsage = serverAuth\n")
    signed = [
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(extensions),
    ]
    _openssl("x509", "-req", "-in", str(request), *signed, "-out", str(cert))
    return ServerCertificate(ca=ca, cert=cert, key=key)
