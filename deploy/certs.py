"""Certificates and keys for a Flower deployment, made with the ``cryptography`` library.

One call lays out everything a federation needs (file names are fixed so scripts can rely on them)::

    OUT/ca.crt                    CA certificate: give it to every party (SuperLink, SuperNodes, flwr CLI)
    OUT/ca.key                    CA private key: keep it offline at the coordinating site
    OUT/server.pem                SuperLink TLS certificate (signed by the CA, with the given SANs)
    OUT/server.key                SuperLink TLS private key
    OUT/hospitals/<name>.key      SuperNode authentication private key (OpenSSH, ECDSA P-384), to <name> only
    OUT/hospitals/<name>.pub      its public key (OpenSSH), registered with ``flwr supernode register``

Flower's SuperNode authentication wants NIST-curve EC keys in OpenSSH format (the SuperNode loads the
private key with ``load_ssh_private_key``, the CLI the public one with ``load_ssh_public_key``).
A hospital that prefers to keep its private key in-house runs :func:`write_node_keypair` itself
(``promptsam deploy keygen``) and sends only the ``.pub`` file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DEFAULT_SANS = ("IP:127.0.0.1", "DNS:localhost")


@dataclass
class CertBundle:
    """Paths written by :func:`generate_certs`."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    # hospital name -> (private key, public key)
    hospitals: dict[str, tuple[Path, Path]] = field(default_factory=dict)


def bundle_paths(out: str | Path, hospitals: list[str]) -> CertBundle:
    """The file layout of a bundle rooted at ``out`` (nothing is read or written)."""
    out = Path(out)
    return CertBundle(
        out=out,
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        hospitals={name: node_key_paths(out / "hospitals", name) for name in hospitals},
    )


def node_key_paths(folder: str | Path, name: str) -> tuple[Path, Path]:
    """``(<folder>/<name>.key, <folder>/<name>.pub)``."""
    folder = Path(folder)
    return folder / f"{name}.key", folder / f"{name}.pub"


def parse_san(text: str) -> x509.GeneralName:
    """Parse ``IP:<address>`` or ``DNS:<name>`` into a subject-alternative-name entry.

    Raises:
        ValueError: naming the entry when its kind is unknown or its value invalid.
    """
    kind, sep, value = text.partition(":")
    kind = kind.strip().upper()
    value = value.strip()
    if not sep or not value:
        raise ValueError(f"SAN {text!r}: expected IP:<address> or DNS:<name>")
    if kind == "IP":
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError as err:
            raise ValueError(f"SAN {text!r}: {value!r} is not an IP address") from err
    if kind == "DNS":
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
            raise ValueError(f"SAN {text!r}: {value!r} is not a DNS name")
        return x509.DNSName(value)
    raise ValueError(f"SAN {text!r}: unknown kind {kind!r} (use IP: or DNS:)")


def validate_names(names: list[str]) -> None:
    """Hospital names become file names: letters, digits, ``_ . -``; unique.

    Raises:
        ValueError: naming the offending entry.
    """
    seen: set[str] = set()
    for name in names:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"hospital name {name!r}: use 1-63 letters, digits, '_', '.', '-' "
                             "(starting with a letter or digit)")
        if name in seen:
            raise ValueError(f"hospital name {name!r} given twice")
        seen.add(name)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "promptsam federation"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def create_ca(common_name: str = "promptsam CA", days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey,
                                                                             x509.Certificate]:
    """A self-signed CA (P-384, SHA-384) that may sign end-entity certificates only."""
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def create_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: list[str],
                       days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the SuperLink, signed by the CA, valid for ``sans``.

    Args:
        sans: entries like ``IP:127.0.0.1`` or ``DNS:superlink.example.org`` (at least one).
    """
    if not sans:
        raise ValueError("the server certificate needs at least one SAN (e.g. DNS:superlink.example.org)")
    names = [parse_san(s) for s in sans]
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.timezone.utc)
    first = names[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(first)))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def create_node_keypair(comment: str = "") -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: ``(private OpenSSH PEM, public OpenSSH line)``.

    The public line is ``ecdsa-sha2-nistp384 AAAA... <comment>``, the format ``flwr supernode register`` reads.
    """
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode()
    return private, public + b"\n"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_free(paths: list[Path], force: bool) -> None:
    if force:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} already exists (and {len(existing) - 1} more); "
                              "refusing to overwrite keys, pass --force to replace them")


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_node_keypair(folder: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``<folder>/<name>.key`` (mode 600) and ``<folder>/<name>.pub``; returns both paths."""
    validate_names([name])
    private_path, public_path = node_key_paths(folder, name)
    _check_free([private_path, public_path], force)
    private, public = create_node_keypair(comment=name)
    _write(private_path, private, private=True)
    _write(public_path, public, private=False)
    return private_path, public_path


def generate_certs(out: str | Path, sans: list[str], hospitals: list[str], force: bool = False,
                   ca_days: int = 3650, server_days: int = 825) -> CertBundle:
    """Create the CA, the SuperLink certificate and one authentication key pair per hospital.

    Everything is validated before anything is written; existing files are kept unless ``force``.

    Raises:
        ValueError: a bad SAN or hospital name (named in the message).
        FileExistsError: a target file exists and ``force`` is False.
    """
    validate_names(hospitals)
    for s in sans:
        parse_san(s)
    bundle = bundle_paths(out, hospitals)
    targets = [bundle.ca_cert, bundle.ca_key, bundle.server_cert, bundle.server_key]
    targets += [p for pair in bundle.hospitals.values() for p in pair]
    _check_free(targets, force)

    ca_key, ca_cert = create_ca(days=ca_days)
    server_key, server_cert = create_server_cert(ca_key, ca_cert, sans, days=server_days)
    _write(bundle.ca_cert, _pem_cert(ca_cert), private=False)
    _write(bundle.ca_key, _pem_key(ca_key), private=True)
    _write(bundle.server_cert, _pem_cert(server_cert), private=False)
    _write(bundle.server_key, _pem_key(server_key), private=True)
    for name in hospitals:
        write_node_keypair(bundle.out / "hospitals", name, force=True)
    return bundle


