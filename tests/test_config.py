"""Config: embedded defaults, the minimal TOML of DESIGN.md, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, load_config

MINIMAL = """
[node]
ae_title = "HARMONODE"
host = "127.0.0.1"
port = 11112
data_dir = "var"

[pipeline]
quiet_seconds = 10

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
"""


def test_defaults_are_embedded():
    cfg = load_config(None, env={})
    assert cfg.node.ae_title == "HARMONODE" and cfg.node.port == 11112 and cfg.pipeline.quiet_seconds == 10
    assert cfg.destinations == ()


def test_minimal_config_of_the_design_works_as_written(tmp_path: Path):
    p = tmp_path / "n.toml"
    p.write_text(MINIMAL)
    cfg = load_config(p, env={})
    assert cfg.destinations[0].ae_title == "ORTHANC" and cfg.destinations[0].port == 4242
    assert cfg.destination_by_ae("ORTHANC").name == "pacs"


def test_example_config_in_deploy_loads():
    cfg = load_config(Path(__file__).parent.parent / "deploy" / "node.example.toml", env={})
    assert cfg.node.ae_title


def test_environment_overrides(tmp_path: Path):
    p = tmp_path / "n.toml"
    p.write_text(MINIMAL)
    cfg = load_config(
        p,
        env={
            "HARMONODE_NODE_PORT": "11999",
            "HARMONODE_NODE_ALLOWED_CALLING_AES": "CT1, MR1",
            "HARMONODE_NODE_FSYNC": "false",
        },
    )
    assert cfg.node.port == 11999 and cfg.node.allowed_calling_aes == ("CT1", "MR1") and cfg.node.fsync is False


@pytest.mark.parametrize(
    "text, message",
    [
        ("[node]\nport = 'abc'\n", "cannot read"),
        ("[node]\nprot = 1\n", "unknown key"),
        ("[nodes]\n", "unknown section"),
        ("[node]\nae_title = 'WAY_TOO_LONG_AE_TITLE'\n", "not a valid AE title"),
        ("[[destinations]]\nname = 'x'\nae_title = 'X'\n", "missing key 'port'"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str):
    p = tmp_path / "n.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(p, env={})


def test_missing_file_says_where_an_example_is(tmp_path: Path):
    with pytest.raises(ConfigError, match="node.example.toml"):
        load_config(tmp_path / "nope.toml", env={})


@pytest.mark.parametrize("listeners", [0, -1, 65])
def test_listeners_out_of_range_is_refused(tmp_path: Path, listeners: int):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"[node]\nlisteners = {listeners}\n")
    with pytest.raises(ConfigError, match="listeners"):
        load_config(cfg, env={})


def test_listeners_default_to_one_process():
    assert load_config(None, env={}).node.listeners == 1
