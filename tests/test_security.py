"""Security at the door: calling-AE and address allow-lists, TLS."""

from __future__ import annotations

import ssl

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from builders import tls_files
from conftest import make_config
from node.app import Node


def echo(port: int, calling: str = "SCANNER", tls: ssl.SSLContext | None = None) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONODE", tls_args=(tls, "127.0.0.1") if tls else None)
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


@pytest.fixture
def started():
    nodes = []

    def start(cfg):  # noqa: ANN001, ANN202
        n = Node(cfg)
        n.start(("listen",))
        nodes.append(n)
        return n

    yield start
    for n in nodes:
        n.stop()


def test_calling_ae_allow_list(tmp_path, started):
    n = started(make_config(tmp_path / "n", node={"allowed_calling_aes": ("CT_ROOM1",)}))
    assert not echo(n.port, "INTRUDER")
    assert echo(n.port, "CT_ROOM1")


def test_address_allow_list(tmp_path, started):
    n = started(make_config(tmp_path / "n", node={"allowed_addresses": ("10.9.9.9",)}))
    assert not echo(n.port)
    m = started(make_config(tmp_path / "m", node={"allowed_addresses": ("127.0.0.1",)}))
    assert echo(m.port)


def test_tls(tmp_path, started):
    key, crt = tls_files(tmp_path)
    n = started(make_config(tmp_path / "n", tls={"enabled": True, "cert_file": str(crt), "key_file": str(key)}))
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(crt))
    assert echo(n.port, tls=client)
    assert not echo(n.port)  # plain DICOM to a TLS port fails
