"""Shared fixtures: a node running in this process on a free loopback port, and the real peers."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from node.app import Node  # noqa: E402
from node.config import Config, load_config, with_overrides  # noqa: E402
from peers import free_port  # noqa: E402


def make_config(data_dir: Path, **sections) -> Config:  # noqa: ANN003
    """A test config: free port, temp data dir, short quiet period; ``sections`` override more."""
    base = with_overrides(
        load_config(None, env={}),
        node={"port": free_port(), "data_dir": str(data_dir)},
        pipeline={"quiet_seconds": 1.0, "poll_seconds": 0.1},
        queue={"backoff_base_s": 0.2, "backoff_max_s": 2.0},
        delivery={"backoff_base_s": 0.2, "backoff_max_s": 2.0},
    )
    return with_overrides(base, **sections) if sections else base


@pytest.fixture
def node_config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "node")


@pytest.fixture
def node(node_config: Config) -> Iterator[Node]:
    """A node with every role started, on a free port, stopped after the test."""
    n = Node(node_config)
    n.start()
    yield n
    n.stop()


@pytest.fixture(autouse=True)
def _quiet_pynetdicom() -> None:
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


@pytest.fixture(autouse=True)
def _pydicom_validation_as_it_was() -> Iterator[None]:
    """dicomweb-client sets pydicom's validation to RAISE around its file functions and, when one raises, never
    sets it back (``dicomweb_client.file._enforce_standard_conformance`` has no ``finally``): every later test
    would then read and write as strictly as it does. Each test starts and ends with the modes it found."""
    from pydicom import config

    reading, writing = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    yield
    config.settings.reading_validation_mode, config.settings.writing_validation_mode = reading, writing
