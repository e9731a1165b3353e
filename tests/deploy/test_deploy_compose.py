"""Container files and launch scripts: compose structure, TLS flags everywhere, scripts' commands.

No Docker engine runs here: the compose files are checked structurally, and with ``docker compose config``
(or docker-compose v1) when such a CLI is installed, which validates against the Compose schema without
an engine. Without the CLI that check skips, except under CI (env ``CI=true``), where it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.commands import superlink_command, supernode_command
from deploy.compose import federation_compose, hospital_compose, render, write_compose_files

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# The scripts call promptsam / flwr: put this interpreter's scripts folder first, as an activated venv would.
PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
SUPERLINK_TLS = ["--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"]
SUPERNODE_TLS = ["--root-certificates", "--auth-supernode-private-key", "--node-config"]


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _sources(service: dict) -> list[str]:
    return [v.split(":")[0] for v in service.get("volumes", [])]


def test_committed_compose_files_are_the_generators_output(tmp_path: Path) -> None:
    write_compose_files(tmp_path, ["hospital-a", "hospital-b"])
    for name in ("compose.yaml", "compose.hospital.yaml"):
        assert (tmp_path / name).read_text() == (DEPLOY / name).read_text(), \
            f"deploy/{name} is stale: run `promptsam deploy compose --hospitals hospital-a hospital-b`"


@pytest.mark.parametrize("hospitals", [["a", "b"], [f"h{i}" for i in range(8)]])
def test_federation_compose_structure(hospitals: list[str]) -> None:
    data = federation_compose(hospitals)
    services = data["services"]
    assert set(services) == {"superlink", "serverapp", "register", *(f"supernode-{h}" for h in hospitals)}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        assert "--insecure" not in service.get("command", []), name
    link = services["superlink"]
    assert link["image"].startswith("flwr/superlink:1.42")
    for flag in SUPERLINK_TLS:
        assert flag in link["command"], flag
    assert link["command"][link["command"].index("--isolation") + 1] == "process"
    assert link["ports"] == ["8000:8000"]
    assert services["serverapp"]["entrypoint"] == ["flower-superexec"]
    assert "--root-certificates" in services["serverapp"]["command"]
    assert services["serverapp"]["build"]["dockerfile"] == "deploy/Dockerfile"
    data_volumes, keys = set(), set()
    for h in hospitals:
        node = services[f"supernode-{h}"]
        for flag in SUPERNODE_TLS:
            assert flag in node["command"], (h, flag)
        assert node["command"][node["command"].index("--node-config") + 1] == 'data-path="/data"'
        assert node["depends_on"] == {"register": {"condition": "service_completed_successfully"}}
        assert "ports" not in node, "a SuperNode only connects out; it exposes nothing"
        data_volume = next(v for v in node["volumes"] if v.endswith(":/data:ro"))
        key = next(v for v in node["volumes"] if v.endswith(":/app/keys/node.key:ro"))
        data_volumes.add(data_volume)
        keys.add(key)
        assert f"/{h}:" in data_volume and f"/{h}.key:" in key
    assert len(data_volumes) == len(keys) == len(hospitals), "each hospital: its own data and key"
    registered = [v for v in services["register"]["volumes"] if v.endswith(".pub:ro") or ".pub:" in v]
    assert len(registered) == len(hospitals)
    assert not any(".key" in s for s in _sources(services["register"])), "private keys stay with hospitals"
    assert not any(".key" in s for s in _sources(services["serverapp"]))


def test_hospital_compose_needs_its_settings() -> None:
    node = hospital_compose()["services"]["supernode"]
    text = yaml.safe_dump(node)
    for var in ("SUPERLINK_ADDRESS", "DATA_DIR", "NODE_KEY", "CA_CERT"):
        assert var in text
    for flag in SUPERNODE_TLS:
        assert flag in node["command"]


def test_bad_hospital_names_are_refused() -> None:
    with pytest.raises(ValueError, match="'bad name'"):
        federation_compose(["ok", "bad name"])
    with pytest.raises(ValueError, match="at least one"):
        federation_compose([])


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("name,env", [
    ("compose.yaml", {}),
    ("compose.hospital.yaml", {"SUPERLINK_ADDRESS": "link.example.org:8000", "DATA_DIR": "/srv/data",
                               "NODE_KEY": "/srv/keys/a.key"}),
])
def test_docker_compose_config_validates(name: str, env: dict, tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        message = "no `docker compose` / `docker-compose` CLI installed (apt-get install docker-compose; .ci/run installs it)"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    full_env = {**os.environ, **env}
    res = subprocess.run([*cli, "-f", str(DEPLOY / name), "config"], capture_output=True, text=True,
                         env=full_env, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)
    assert set(resolved["services"]) == set(_load(name)["services"])
    if name == "compose.hospital.yaml":
        missing = {k: v for k, v in full_env.items() if k != "SUPERLINK_ADDRESS"}
        res = subprocess.run([*cli, "-f", str(DEPLOY / name), "config"], capture_output=True, text=True,
                             env=missing, timeout=60, cwd=tmp_path)
        assert res.returncode != 0 and "SUPERLINK_ADDRESS" in res.stderr


def test_render_has_header_and_roundtrips() -> None:
    data = federation_compose(["a"])
    text = render(data, "--hospitals a", "x", "compose.yaml")
    assert text.startswith("# Generated by `promptsam deploy compose --hospitals a`")
    assert yaml.safe_load(text) == data


def test_dockerfile_builds_the_project_without_secrets() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    import tomllib

    packages = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for part in (pattern.rstrip("*") for pattern in packages["include"]):  # every package the wheel holds
        assert f"COPY {part} ./{part}" in text, part
    assert "USER app" in text and "--uid 49999" in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "**/*.key" in ignore and "**/.venv" in ignore


def _script(name: str, env: dict[str, str]) -> str:
    res = subprocess.run(["bash", str(DEPLOY / "scripts" / name)], capture_output=True, text=True, timeout=30,
                         env={"PATH": PATH, "DRY_RUN": "1", **env})
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_scripts_print_the_same_commands_as_the_builders(tmp_path: Path) -> None:
    for name in ("superlink.sh", "supernode.sh", "register.sh", "run.sh"):
        assert subprocess.run(["bash", "-n", str(DEPLOY / "scripts" / name)]).returncode == 0
    line = _script("superlink.sh", {"CERTS_DIR": "/c", "PORT": "9000", "DATABASE": "/s/state.db"})
    expected = superlink_command("/c/ca.crt", "/c/server.pem", "/c/server.key", host="0.0.0.0", port=9000,
                                 database="/s/state.db")
    assert line.split() == ["flower-superlink", *expected[1:]]
    data = tmp_path / "data"
    data.mkdir()
    line = _script("supernode.sh", {"SUPERLINK_ADDRESS": "link:8000", "CA_CERT": "/c/ca.crt",
                                    "NODE_KEY": "/k/a.key", "DATA_DIR": str(data), "RUNTIME_PORT": "9100"})
    expected = supernode_command("link:8000", "/c/ca.crt", "/k/a.key", {"data-path": str(data)}, port=9100)
    # The script quotes the node config for the shell; compare the flags around it.
    assert line.startswith("flower-supernode --superlink link:8000 --root-certificates /c/ca.crt "
                           "--auth-supernode-private-key /k/a.key --node-config ")
    assert f'data-path=\\"{data}\\"' in line
    assert line.endswith(" ".join(expected[expected.index("--isolation"):]))


def _supernode_script(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEPLOY / "scripts" / "supernode.sh")], capture_output=True, text=True,
                          timeout=30, env={"PATH": PATH, **env})


def test_supernode_script_refuses_missing_settings(tmp_path: Path) -> None:
    res = _supernode_script({})
    assert res.returncode != 0 and "SUPERLINK_ADDRESS" in res.stderr
    env = {"SUPERLINK_ADDRESS": "l:1", "CA_CERT": str(tmp_path / "ca.crt"), "NODE_KEY": str(tmp_path / "a.key"),
           "DATA_DIR": str(tmp_path)}
    res = _supernode_script(env)
    assert res.returncode == 2 and "ca.crt missing" in res.stderr
    (tmp_path / "ca.crt").write_text("x")
    res = _supernode_script(env)
    assert res.returncode == 2 and "a.key missing" in res.stderr
    (tmp_path / "a.key").write_text("x")
    res = _supernode_script(env)
    assert res.returncode == 2 and "needs images/ and masks/" in res.stderr
    res = _supernode_script({**env, "DATA_DIR": str(tmp_path / "nowhere")})
    assert res.returncode == 2 and "is not a folder" in res.stderr


def test_load_script_run_config_uses_declared_keys_and_formats_a_table(tmp_path: Path) -> None:
    import tomllib

    from deploy.load import format_table, project_run_config

    declared = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    rc = project_run_config(tmp_path, nodes=3, rounds=2, local_steps=1)
    assert set(rc) <= set(declared), "flwr run refuses run-config keys missing from pyproject.toml"
    assert rc["min-nodes"] == 3 and rc["run-dir"] == str(tmp_path)
    row = {"nodes": 3, "online_s": 1.0, "round_s": 2.25, "round_s_max": 3.0, "accepted": 3, "run_s": 9.0,
           "peak_mem_gib": 1.5, "ok": True}
    table = format_table([row]).splitlines()
    assert len(table) == 3 and table[2] == "| 3 | 1.0 | 2.2 | 3.0 | 3/3 | 9.0 | 1.50 | yes |"


def test_run_config_check_names_unknown_keys_and_bad_types() -> None:
    from deploy.commands import check_run_config
    from shared_model.config import ConfigError

    full = check_run_config(DEPLOY.parent, {"num-server-rounds": 2, "run-dir": "/tmp/x"})
    assert full["num-server-rounds"] == 2 and "local-steps" in full
    with pytest.raises(ConfigError, match="local-stepz"):
        check_run_config(DEPLOY.parent, {"local-stepz": 3})
    with pytest.raises(ConfigError, match="local-steps"):
        check_run_config(DEPLOY.parent, {"local-steps": "ten"})
    with pytest.raises(ConfigError, match="model"):
        check_run_config(DEPLOY.parent, {"model-config": '{"preset": "huge"}'})
    # A bad value names the flag it came from and the key as written there.
    with pytest.raises(ConfigError, match="^--run-config num-server-rounds=-1: num-server-rounds: must be >= 1$"):
        check_run_config(DEPLOY.parent, {"num-server-rounds": -1, "run-dir": "/tmp/x"})
    with pytest.raises(ConfigError, match="^--run-config train-config=.*: train-config.steps: must be >= 1"):
        check_run_config(DEPLOY.parent, {"train-config": '{"steps": 0}'})


def test_run_script_checks_before_submitting() -> None:
    env = {"PATH": PATH, "DRY_RUN": "1"}
    ok = subprocess.run(["bash", str(DEPLOY / "scripts" / "run.sh")], capture_output=True, text=True, timeout=60,
                        env={**env, "RUN_CONFIG": 'num-server-rounds=2 run-dir="/x"'})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("flwr run ") and "--stream" in ok.stdout and "num-server-rounds=2" in ok.stdout
    bad = subprocess.run(["bash", str(DEPLOY / "scripts" / "run.sh")], capture_output=True, text=True, timeout=60,
                         env={**env, "RUN_CONFIG": "local-stepz=2"})
    assert bad.returncode == 2 and "local-stepz" in bad.stderr


def test_cli_prints_each_partys_command_and_writes_connections(tmp_path: Path, capsys, monkeypatch) -> None:
    import tomllib

    from deploy.certs import generate_certs
    from cli.deploy import main

    certs = generate_certs(tmp_path / "c", ["DNS:localhost"], ["a"])
    assert main(["superlink", "--certs", str(certs.out), "--port", "9100"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("flower-superlink --ssl-ca-certfile") and "--enable-supernode-auth" in line
    assert "--port 9100" in line and "--disable-runtime-dependency-installation" in line
    data = tmp_path / "data"
    data.mkdir()
    assert main(["supernode", "--superlink", "link:8000", "--ca", str(certs.ca_cert), "--key",
                 str(certs.hospitals["a"][0]), "--data-path", str(data), "--node-config", "partition-id=3"]) == 0
    line = capsys.readouterr().out.strip()
    assert f"--node-config 'data-path=\"{data}\" partition-id=3'" in line
    assert main(["supernode", "--superlink", "l:1", "--ca", str(certs.ca_cert), "--key", str(certs.hospitals["a"][0]),
                 "--data-path", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                                   'address = ":local:"\n')
    assert main(["connect", "--name", "fed", "--address", "link:8000", "--ca", str(certs.ca_cert)]) == 0
    config = tomllib.loads((tmp_path / "home" / "config.toml").read_text())["superlink"]
    assert config["default"] == "fed" and config["local"] == {"address": ":local:"}
    assert config["fed"] == {"address": "link:8000", "root-certificates": str(certs.ca_cert.resolve())}
