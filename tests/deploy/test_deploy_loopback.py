"""Real Flower processes on loopback with a throwaway app: TLS, SuperNode authentication, refusals.

One SuperLink (TLS, ``--enable-supernode-auth``, no run-time dependency installation) and two
registered SuperNodes with their own keys, Runtime API ports and node configs serve a 2-round run;
SuperNodes with an unregistered key, without the CA, with another CA or with ``--insecure`` are refused.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.certs import CertBundle, generate_certs, write_node_keypair
from deploy.local import LocalFederation, wait_for

from deploy_helpers import write_miniapp

SCRIPTS = Path(__file__).resolve().parents[2] / "deploy" / "scripts"
NODES = {"h1": {"delta": 1.0, "n": 1}, "h2": {"delta": 4.0, "n": 2}}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, loopback_certs: CertBundle):
    """SuperLink + two registered, online SuperNodes; everything is stopped afterwards."""
    fed = LocalFederation(tmp_path_factory.mktemp("fed"), loopback_certs)
    try:
        fed.start_superlink()
        for name in NODES:
            fed.register(loopback_certs.hospitals[name][1])
        nodes = [fed.start_supernode(name, cfg) for name, cfg in NODES.items()]
        fed.node_ids = [fed.wait_online(p) for p in nodes]
        yield fed
    finally:
        fed.close()


def _refused(fed: LocalFederation, name: str, **kwargs) -> tuple[int, str]:
    proc = fed.start_supernode(name, {"delta": 0.0, "n": 1}, max_retries=1, max_wait_time=20, **kwargs)
    try:
        proc.popen.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.stop()
        pytest.fail(f"{name}: SuperNode still running after 60 s, expected it to be refused:\n{proc.text()}")
    return proc.popen.returncode, proc.text()


def test_two_registered_supernodes_run_two_rounds(federation: LocalFederation, tmp_path: Path) -> None:
    assert len(set(federation.node_ids)) == 2
    app = write_miniapp(tmp_path / "app")
    res = federation.run(app, timeout=240)
    assert res.ok, f"{res.status}: {res.details}\n{res.output}"
    # 2 rounds x (1 * 1.0 + 2 * 4.0) / 3 = 6.0
    assert "FINAL [6.0, 6.0, 6.0]" in res.output, res.output
    assert [r["status"] for r in federation.runs()] == ["finished:completed"]


def test_unregistered_key_is_refused(federation: LocalFederation) -> None:
    code, log = _refused(federation, "rogue")
    assert code != 0
    assert "Failed to activate SuperNode" in log


def test_supernode_without_the_ca_cannot_connect(federation: LocalFederation) -> None:
    code, log = _refused(federation, "h1", ca_cert=None)
    assert code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in log


def test_supernode_trusting_another_ca_cannot_connect(federation: LocalFederation, tmp_path: Path) -> None:
    other = generate_certs(tmp_path / "other", ["IP:127.0.0.1"], [])
    code, log = _refused(federation, "h1", ca_cert=other.ca_cert)
    assert code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in log


def test_insecure_supernode_cannot_connect(federation: LocalFederation) -> None:
    # With its key: Flower refuses authentication over plain HTTP (exit code 303).
    code, log = _refused(federation, "h1", insecure=True)
    assert code != 0
    assert "Exit Code: 303" in log, log
    # Without a key: plain HTTP against the HTTPS port fails to connect.
    proc = federation.start_supernode("h2", {"delta": 0.0, "n": 1}, private_key=None, insecure=True,
                                      max_retries=1, max_wait_time=20)
    wait_for(lambda: not proc.alive(), 60, "insecure SuperNode exit")
    assert proc.popen.returncode != 0
    assert "SuperNode ID:" not in proc.text()


def test_register_script_registers_new_keys_and_skips_known_ones(federation: LocalFederation,
                                                                  tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(federation.certs.hospitals["h1"][1], keys / "h1.pub")  # registered by the fixture
    write_node_keypair(keys, "h3")
    env = {**federation.env, "SUPERLINK_ADDRESS": federation.address, "CA_CERT": str(federation.certs.ca_cert),
           "KEYS_DIR": str(keys), "CONNECTION": "script", "WAIT_S": "30"}
    res = subprocess.run(["bash", str(SCRIPTS / "register.sh")], capture_output=True, text=True, env=env,
                         timeout=180, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "already registered: h1" in res.stdout
    assert "registered h3:" in res.stdout


def test_only_registered_nodes_come_online(federation: LocalFederation) -> None:
    nodes = {int(n["node-id"]): n["status"] for n in federation.supernodes()}
    assert {i for i, status in nodes.items() if status == "online"} == set(federation.node_ids)
    # h1, h2 online; h3 registered by the script but never started; 'rogue' was never registered.
    assert sorted(nodes.values()) == ["online", "online", "registered"]
