"""Bytes that do not hold what they say are refused with a status and quarantined, never acknowledged."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from builders import SeriesSpec, synthetic_instance
from conftest import make_config
from handlers.store import CANNOT_UNDERSTAND, StoreLimits, StoreRefused, store_encoded
from node.app import Node
from peers import run_tool
from storage.store import Store, open_store

REFUSED = CANNOT_UNDERSTAND | 0x213


@pytest.fixture
def store(tmp_path: Path):  # noqa: ANN201
    with open_store(tmp_path / "node") as s:
        yield s


def instance() -> Dataset:
    return synthetic_instance(SeriesSpec("P1", "ENC^ODING", "1.2.826.0.1.3680043.8.498.1", "20240101", "120000",
                                         "A1", "1.2.826.0.1.3680043.8.498.2", "CT", 1), 1)  # fmt: skip


def part10(ds: Dataset, label: str, body_syntax: str) -> bytes:
    """Preamble and file meta saying ``label``, then the dataset encoded as ``body_syntax``."""
    body = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = body_syntax
    dcmwrite(body, ds, enforce_file_format=True)
    raw = body.getvalue()
    start = 132 + 12 + int.from_bytes(raw[140:144], "little")
    meta = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = label
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + raw[start:]


def keep(store_: Store, encoded: bytes, syntax: str, limits: StoreLimits | None = None) -> tuple[int, str]:
    return store_encoded(encoded, syntax, CTImageStorage, "", store_.files, store_.index, "TEST", limits)


def test_explicit_bytes_on_an_implicit_context_are_refused(store: Store) -> None:
    with pytest.raises(StoreRefused) as refused:
        keep(store, part10(instance(), ImplicitVRLittleEndian, ExplicitVRLittleEndian), ImplicitVRLittleEndian)
    assert refused.value.status == REFUSED and "explicit VR" in refused.value.reason
    with pytest.raises(StoreRefused, match="not explicit VR"):
        keep(store, part10(instance(), ExplicitVRLittleEndian, ImplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert store.index.counts()["instances"] == 0


@pytest.mark.peers
def test_correctly_labelled_bytes_are_kept_and_dcmtk_reads_them(store: Store) -> None:
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        ds = instance()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.3.{len(syntax)}"
        assert keep(store, part10(ds, syntax, syntax), syntax)[0] == 0x0000
    for row in store.index.query("SELECT path FROM instances"):
        run_tool(["dcmdump", "-q", str(store.files.abspath(row["path"]))])  # exits non-zero on unreadable files


@pytest.mark.parametrize("cut", [20, 1])
def test_pixel_data_shorter_than_its_length_is_refused(store: Store, cut: int) -> None:
    encoded = part10(instance(), ExplicitVRLittleEndian, ExplicitVRLittleEndian)
    with pytest.raises(StoreRefused, match="truncated") as refused:
        keep(store, encoded[:-cut], ExplicitVRLittleEndian)
    assert refused.value.status == REFUSED


def test_pixel_data_of_another_size_than_the_image_is_refused(store: Store) -> None:
    ds = instance()
    ds.PixelData = bytes(64)  # 8×8 at 16 bits needs 128
    with pytest.raises(StoreRefused, match="holds 64 bytes where the image attributes need 128"):
        keep(store, part10(ds, ExplicitVRLittleEndian, ExplicitVRLittleEndian), ExplicitVRLittleEndian)


def test_a_deflate_bomb_is_refused_before_it_inflates(store: Store) -> None:
    ds = instance()
    ds.add_new(0x00091010, "OB", bytes(80 * 1024 * 1024))  # a private element of zeros: 80 MiB inflated
    plain = part10(ds, ExplicitVRLittleEndian, ExplicitVRLittleEndian)
    start = 132 + 12 + int.from_bytes(plain[140:144], "little")
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(plain[start:]) + packer.flush()
    assert len(deflated) < 200_000
    head = part10(instance(), DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian)
    head_start = 132 + 12 + int.from_bytes(head[140:144], "little")
    bomb = head[:head_start] + deflated
    with pytest.raises(StoreRefused, match="inflates past") as refused:
        keep(store, bomb, DeflatedExplicitVRLittleEndian)
    assert refused.value.status == REFUSED
    assert keep(store, bomb, DeflatedExplicitVRLittleEndian, StoreLimits(max_inflated_bytes=0))[0] == 0x0000


def test_truncated_pixel_data_over_an_association_gets_a_failure_and_a_quarantined_copy(tmp_path: Path) -> None:
    node = Node(make_config(tmp_path / "node"))
    node.start(("listen",))
    try:
        ds = instance()
        ds.PixelData = bytes(100)
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONODE")
        assert assoc.is_established
        assert int(assoc.send_c_store(ds).Status) == REFUSED
        assert assoc.send_c_echo().Status == 0x0000  # the association and the node keep serving
        assoc.release()
        (item,) = node.files.quarantined()
        assert "pixel data holds 100 bytes" in item["reason"] and "ENC" not in str(item)
        assert node.index.counts()["instances"] == 0
    finally:
        node.stop()
