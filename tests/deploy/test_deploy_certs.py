"""Certificates and SuperNode keys: chain, SANs, TLS handshake, key formats Flower reads, no overwrite."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from deploy.certs import (
    bundle_paths,
    generate_certs,
    parse_san,
    write_node_keypair,
)
from cli.deploy import main as deploy_main

SANS = ["IP:127.0.0.1", "DNS:localhost", "DNS:superlink"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    return generate_certs(tmp_path_factory.mktemp("certs"), SANS, ["hospital-a", "hospital-b"])


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_layout_and_permissions(bundle) -> None:
    expected = bundle_paths(bundle.out, ["hospital-a", "hospital-b"])
    assert expected == bundle
    assert sorted(p.name for p in (bundle.out / "hospitals").iterdir()) == [
        "hospital-a.key", "hospital-a.pub", "hospital-b.key", "hospital-b.pub"]
    for private in (bundle.ca_key, bundle.server_key, *(k for k, _ in bundle.hospitals.values())):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private


def test_chain_verifies_for_every_san_and_nothing_else(bundle) -> None:
    ca, server = _cert(bundle.ca_cert), _cert(bundle.server_cert)
    store = Store([ca])
    for subject in (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
                    x509.DNSName("superlink")):
        chain = PolicyBuilder().store(store).build_server_verifier(subject).verify(server, [])
        assert chain[-1] == ca
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("example.org")).verify(server, [])
    other = generate_certs(bundle.out.parent / "other", ["DNS:localhost"], [])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([_cert(other.ca_cert)])).build_server_verifier(
            x509.DNSName("localhost")).verify(server, [])


def test_server_certificate_extensions(bundle) -> None:
    server = _cert(bundle.server_cert)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "superlink"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    ca = _cert(bundle.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    # The server key file is the key of the certificate.
    key = load_pem_private_key(bundle.server_key.read_bytes(), password=None)
    assert key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) == \
        server.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _handshake(bundle, hostname: str) -> None:
    """A TLS handshake in memory between Python's ssl server (as uvicorn) and a client trusting the CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(bundle.server_cert, bundle.server_key)
    client_ctx = ssl.create_default_context(cafile=str(bundle.ca_cert))
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = client_ctx.wrap_bio(bios[2], bios[3], server_hostname=hostname)
    for _ in range(10):
        done = 0
        for side in (client, server):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        bios[0].write(bios[3].read())  # client -> server
        bios[2].write(bios[1].read())  # server -> client
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def test_tls_handshake_with_python_ssl(bundle) -> None:
    _handshake(bundle, "127.0.0.1")
    _handshake(bundle, "superlink")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(bundle, "evil.example.org")


def test_node_keys_load_the_way_flower_loads_them(bundle) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    for name, (key_path, pub_path) in bundle.hospitals.items():
        private = load_ssh_private_key(key_path.read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        line = pub_path.read_text()
        assert line.startswith("ecdsa-sha2-nistp384 ") and line.rstrip().endswith(name)
        public = load_ssh_public_key(line.encode())
        assert public.public_numbers() == private.public_key().public_numbers()
        assert try_load_public_key(pub_path) == public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    keys = sorted(p.stem for p in (bundle.out / "hospitals").glob("*.pub"))
    assert keys == ["hospital-a", "hospital-b"]


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = generate_certs(tmp_path, ["DNS:localhost"], ["a"])
    ca_before = first.ca_cert.read_bytes()
    with pytest.raises(FileExistsError, match="ca.crt"):
        generate_certs(tmp_path, ["DNS:localhost"], ["a"])
    assert first.ca_cert.read_bytes() == ca_before
    with pytest.raises(FileExistsError, match="a.key"):
        write_node_keypair(tmp_path / "hospitals", "a")
    generate_certs(tmp_path, ["DNS:localhost"], ["a"], force=True)
    assert first.ca_cert.read_bytes() != ca_before


def test_bad_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="FOO:bar"):
        parse_san("FOO:bar")
    with pytest.raises(ValueError, match="not an IP address"):
        parse_san("IP:300.1.1.1")
    with pytest.raises(ValueError, match="'a b'"):
        generate_certs(tmp_path, ["DNS:localhost"], ["a b"])
    with pytest.raises(ValueError, match="given twice"):
        generate_certs(tmp_path, ["DNS:localhost"], ["a", "a"])
    with pytest.raises(ValueError, match="at least one SAN"):
        generate_certs(tmp_path, [], ["a"])
    assert not any(tmp_path.iterdir()), "nothing may be written when the input is invalid"


def test_cli_certs_and_keygen(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "c"
    assert deploy_main(["certs", "--out", str(out), "--san", "DNS:superlink", "--hospitals", "x", "y"]) == 0
    assert (out / "hospitals" / "y.pub").exists()
    assert deploy_main(["certs", "--out", str(out), "--hospitals", "x"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert deploy_main(["keygen", "--name", "z", "--out", str(tmp_path / "site")]) == 0
    assert [p.name for p in (tmp_path / "site").glob("*.pub")] == ["z.pub"]
