"""The deploy files agree with the node: compose publishes the ports the config listens on, both images
expose them and listen beyond loopback, the example configs load, and systemd accepts the hardened unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from node.config import load_config

DEPLOY = Path(__file__).parent.parent / "deploy"


def _published(service: dict) -> dict[int, str]:
    """Container port → host binding of a compose service's ``ports``."""
    out = {}
    for entry in service.get("ports", []):
        *host, container = str(entry).split(":")
        out[int(container)] = ":".join(host)
    return out


def test_compose_publishes_the_dicom_and_web_ports_the_config_listens_on() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"pacs", "viewer", "harmonode", "harmonode-cuda"} <= set(services)
    node = services["harmonode"]
    env = {k: str(v) for k, v in node["environment"].items()}
    config = load_config(DEPLOY / "node.compose.toml", env={k: v for k, v in env.items() if k.startswith("HARMONODE_")})
    assert config.node.host == "0.0.0.0" and config.web.host == "0.0.0.0"  # reachable from the published port
    assert config.web.secure_cookies is False  # plain HTTP on the host's loopback: a Secure cookie is never sent
    ports = _published(node)
    assert set(ports) == {config.node.port, config.web.port}
    assert all(host.startswith("127.0.0.1") for host in ports.values())
    assert "{study}" in config.web.viewer_url and _published(services["viewer"])[80].endswith("3000")
    destination = config.destinations[0]
    assert destination.host == "pacs" and destination.port in _published(services["pacs"])
    gpu = services["harmonode-cuda"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("name, wheels", [("Dockerfile", "whl/cpu"), ("Dockerfile.cuda", "whl/cu")])
def test_images_expose_both_ports_and_listen_beyond_loopback(name: str, wheels: str) -> None:
    text = (DEPLOY / name).read_text()
    defaults = load_config(None, env={})
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert exposed == {defaults.node.port, defaults.web.port}
    assert "HARMONODE_WEB_HOST=0.0.0.0" in text and "HARMONODE_NODE_HOST=0.0.0.0" in text
    assert wheels in text and "USER harmonode" in text and "/healthz" in text


def test_example_config_loads_with_every_section() -> None:
    config = load_config(DEPLOY / "node.example.toml", env={})
    assert config.web.port == 8080 and config.storage.audit_dir == ""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_hardened_unit(tmp_path: Path) -> None:
    text = (DEPLOY / "harmonode.service").read_text()
    for option in ("ProtectSystem=strict", "NoNewPrivileges=true", "PrivateTmp=true", "CapabilityBoundingSet="):
        assert f"\n{option}\n" in text
    assert "ReadWritePaths=/var/lib/harmonode" in text
    # verify checks that ExecStart exists: point it at this environment's harmonode
    unit = tmp_path / "harmonode.service"
    unit.write_text(text.replace("/opt/harmonode/.venv/bin/harmonode", str(Path(sys.executable).parent / "harmonode")))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Unknown" not in proc.stderr and "unknown" not in proc.stderr


def test_cluster_compose_runs_every_role_against_one_database_broker_and_store() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())
    services = compose["services"]
    assert {"database", "broker", "pacs", "listener", "worker-cpu", "dispatcher", "worker-gpu0"} <= set(services)
    roles = {name: s["command"][1] for name, s in services.items() if s.get("command", [""])[0] == "harmonode"}
    assert sorted(roles.values()) == ["dispatch", "listen", "work", "work"]
    for name in roles:
        service = services[name]
        env = {k: str(v) for k, v in service["environment"].items() if k.startswith("HARMONODE_")}
        config = load_config(DEPLOY / "node.compose.toml", env=env)
        assert config.cluster.enabled, name
        assert config.cluster.broker.split("@")[1].startswith("broker:")
        assert config.cluster.database.split("@")[1].startswith("database:")
        assert f"harmonode-store:{config.node.data_dir}" in service["volumes"], name
    assert services["worker-gpu0"]["command"][-2:] == ["--gpu", "0"] and services["worker-gpu0"]["profiles"] == ["gpu"]
    assert set(_published(services["listener"])) == {11112, 8080}
