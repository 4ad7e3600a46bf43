"""Certificates made on the fly for TLS tests: a CA, a server certificate for
127.0.0.1/localhost and a client certificate, all signed by the CA, as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest


def write_pki(root: Path, label: str = "lorapool test") -> dict[str, Path]:
    """PEM files under `root`: ca, server, server_key, client, client_key (keys
    unencrypted PKCS#8, EC P-256). `label` names the subjects, so two calls give
    two unrelated authorities."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    root.mkdir(parents=True, exist_ok=True)

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject, key, issuer, issuer_key, *extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"{label} CA")
    ca = issue(
        ca_name,
        ca_key,
        ca_name,
        ca_key,
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.KeyUsage(True, False, False, False, False, True, True, False, False), True),
    )
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    usages = {
        "server": [
            (x509.SubjectAlternativeName(san), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
        "client": [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
    }
    paths = {"ca": root / "ca.crt"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, extensions in usages.items():
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (x509.BasicConstraints(ca=False, path_length=None), True)
        cert = issue(name(f"{label} {who}"), key, ca_name, ca_key, leaf, *extensions)
        paths[who] = root / f"{who}.crt"
        paths[who].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{who}_key"] = root / f"{who}.key"
        paths[f"{who}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths
