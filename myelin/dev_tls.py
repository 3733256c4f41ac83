"""A development certificate authority and the gRPC server's certificate, for ``myelin up``.

Written once under ``.myelin/security/tls/`` (keys 0600) and kept across restarts: a
client that trusts ``ca.pem`` keeps working. A real deployment mounts its own
certificates (``MYELIN_GRPC_TLS_CERT_FILE`` / ``MYELIN_GRPC_TLS_KEY_FILE``, and
``MYELIN_TLS_CA_FILE`` for clients).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from myelin.nats_identity import security_dir, write_private
from myelin.settings import Settings

VALID_DAYS = 825  # the longest a browser-trusted server certificate may live


@dataclass(frozen=True)
class DevTls:
    ca: Path
    cert: Path
    key: Path


def tls_dir(settings: Settings) -> Path:
    return security_dir(settings) / "tls"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Myelin development"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def ensure_dev_tls(settings: Settings) -> DevTls:
    """The development CA and a server certificate for ``localhost``, ``127.0.0.1`` and
    ``MYELIN_HOST``; created when missing."""
    d = tls_dir(settings)
    out = DevTls(d / "ca.pem", d / "server.pem", d / "server.key")
    if out.ca.exists() and out.cert.exists() and out.key.exists():
        return out
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Myelin development CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    try:
        host_ip = ipaddress.ip_address(settings.host)
        if str(host_ip) != "127.0.0.1":
            names.append(x509.IPAddress(host_ip))
    except ValueError:
        names.append(x509.DNSName(settings.host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    # the CA's key signs this one certificate and is not kept: nothing else can be signed
    write_private(out.key, _pem_key(key))
    write_private(out.cert, cert.public_bytes(serialization.Encoding.PEM))
    write_private(out.ca, ca.public_bytes(serialization.Encoding.PEM))
    return out
