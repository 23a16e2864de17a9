"""The project's private certificate authority (run/tls/), made with `cryptography`: the CA,
one server certificate for the Redis nodes and Sentinels of this host, and a client
certificate for each process or host that talks to Redis over TCP.

Why a private CA: every party is ours, so trust is exactly "signed by this CA"; no public
CA can issue a certificate that Redis or a worker would accept. Server certificates carry
only `serverAuth`+`clientAuth` (a Redis node is also a client of its primary and its
Sentinels); client certificates only `clientAuth`, so a worker host's certificate, stolen,
cannot stand in for Redis (TLS clients check the purpose).

Layout: `ca.crt`/`ca.key` sign; `trust.crt` is what everyone verifies against (the CA,
plus the previous CA while a rotation is under way); `servers/NAME.crt|key`,
`clients/NAME.crt|key`. Directories 0700, keys 0600, written whole (rename) or not at all.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 825
RENEW_BEFORE_DAYS = 30  # `tls check` warns (exit 1) this long before an expiry


class Kind(StrEnum):
    SERVER = "server"
    CLIENT = "client"


@dataclass(frozen=True)
class Expiry:
    """One certificate file and when it stops being valid."""

    path: Path
    subject: str
    not_after: dt.datetime

    def days_left(self, now: dt.datetime) -> int:
        return (self.not_after - now).days


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Titan Plugin Manager"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h for h in hosts if h):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def new_ca(directory: Path) -> None:
    """A new signing CA (ca.crt/ca.key). The previous CA, if any, stays in trust.crt until
    retire_previous(): what it signed keeps working while new certificates go out."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = _name(f"Titan Plugin Manager CA {now:%Y-%m-%d} {os.urandom(4).hex()}")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            # key identifiers: during a rotation two CAs are trusted, and a certificate
            # names which one signed it by key, not only by name
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    previous = (directory / "ca.crt").read_bytes() if (directory / "ca.crt").exists() else b""
    _write(directory / "ca.key", _key_pem(key), 0o600)
    _write(directory / "ca.crt", pem, 0o644)
    _write(directory / "trust.crt", pem + previous, 0o644)


def retire_previous(directory: Path) -> None:
    """Trust only the current CA again (the end of a rotation)."""
    _write(directory / "trust.crt", (directory / "ca.crt").read_bytes(), 0o644)


def issue(directory: Path, kind: Kind, name: str, hosts: list[str] | None = None) -> Path:
    """A new key and certificate NAME signed by the current CA, under servers/ or clients/;
    returns the certificate's path (the key is beside it, .key)."""
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind is Kind.SERVER:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(min(now + dt.timedelta(days=LEAF_DAYS),
                                    ca.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.public_key()), critical=False))  # type: ignore[arg-type]
    if kind is Kind.SERVER:
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(hosts or [])),
                                        critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    where = directory / f"{kind.value}s"
    _write(where / f"{name}.key", _key_pem(key), 0o600)
    _write(where / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return where / f"{name}.crt"


def names_in(cert_path: Path) -> set[str]:
    """The addresses and DNS names a server certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in alt.get_values_for_type(x509.IPAddress)} | set(
        alt.get_values_for_type(x509.DNSName))


def signed_by_current(directory: Path, cert_path: Path) -> bool:
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).issuer == ca.subject


def expiries(directory: Path) -> list[Expiry]:
    """Every certificate under the directory (each CA in trust.crt too), soonest first."""
    found = []
    for path in sorted([directory / "trust.crt", *directory.glob("servers/*.crt"),
                        *directory.glob("clients/*.crt")]):
        if not path.exists():
            continue
        for cert in x509.load_pem_x509_certificates(path.read_bytes()):
            common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            found.append(Expiry(path, str(common[0].value) if common else "?",
                                cert.not_valid_after_utc))
    return sorted(found, key=lambda e: e.not_after)
