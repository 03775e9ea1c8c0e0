"""Slots: one fsync per received instance, and recovery putting back what a crash left in tmp/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage.files import FileStore
from storage.slots import XATTR, SlotRecord, read_record, supports_slots

STUDY, SERIES = "1.2.3", "1.2.3.4"

pytestmark = pytest.mark.skipif(not supports_slots(Path(__file__).parent), reason="no user xattrs here")


def pending_slots(files: FileStore) -> list[Path]:
    return sorted(p for p in files.tmp.iterdir() if p.stat().st_size)


def test_written_instance_is_in_place_at_once_and_its_slot_goes_after_the_flush(tmp_path):
    files = FileStore(tmp_path, background=False)
    stored = files.write_instance(STUDY, SERIES, "1.5", b"DICM" * 1000)
    assert stored.path.read_bytes() == b"DICM" * 1000 and stored.version == 1
    [slot] = pending_slots(files)  # durable copy under a name made durable beforehand
    assert read_record(slot) == SlotRecord("objects", STUDY, SERIES, "1.5", 4000, stored.sha256)
    assert slot.stat().st_nlink == 2
    files.flush()
    assert pending_slots(files) == []
    files.close()
    assert list(files.tmp.iterdir()) == []  # unused empty slots are removed too


def test_recovery_puts_back_an_instance_whose_final_name_was_lost(tmp_path):
    files = FileStore(tmp_path, background=False)
    stored = files.write_instance(STUDY, SERIES, "1.6", b"first")
    files.flush()
    second = files.write_instance(STUDY, SERIES, "1.6", b"second")  # a new version, not yet settled
    assert second.version == 2
    second.path.unlink()  # as if the power went before the directory fsync: only the slot names it
    files._settler = None  # noqa: SLF001 - the process "dies" without settling
    again = FileStore(tmp_path)
    assert again.settle_slots() == (1, 0)
    assert second.path.read_bytes() == b"second"
    assert stored.path.read_bytes() == b"first"
    assert list(again.tmp.iterdir()) == []


def test_recovery_drops_torn_slots_and_keeps_linked_ones(tmp_path):
    files = FileStore(tmp_path, slots=False)
    torn = files.tmp / "a.slot"
    torn.write_bytes(b"half")
    os.setxattr(torn, XATTR, SlotRecord("objects", STUDY, SERIES, "1.7", 10, "0" * 64).encode())
    unrecorded = files.tmp / "b.slot"
    unrecorded.write_bytes(b"no record: the write never finished")
    (files.tmp / "c.slot").touch()  # an unused slot of the pool
    kept = files.write_instance(STUDY, SERIES, "1.8", b"kept")
    linked = files.tmp / "d.slot"
    os.link(kept.path, linked)  # the final name survived: only the slot's own name goes
    os.setxattr(linked, XATTR, SlotRecord("objects", STUDY, SERIES, "1.8", 4, kept.sha256).encode())
    assert files.settle_slots() == (0, 2)
    assert list(files.tmp.iterdir()) == []
    assert kept.path.read_bytes() == b"kept"
    assert not list(files.instance_dir(STUDY, SERIES).glob("1.7*"))


def test_without_slots_the_write_is_settled_before_it_returns(tmp_path):
    files = FileStore(tmp_path, slots=False)
    stored = files.write_instance(STUDY, SERIES, "1.9", b"bytes")
    assert stored.path.read_bytes() == b"bytes"
    assert list(files.tmp.iterdir()) == []


def test_duplicate_bytes_leave_no_slot_behind(tmp_path):
    files = FileStore(tmp_path, background=False)
    first = files.write_instance(STUDY, SERIES, "1.10", b"same")
    again = files.write_instance(STUDY, SERIES, "1.10", b"same", known={first.sha256: 1})
    assert again.duplicate and again.version == 1
    files.close()
    assert list(files.tmp.iterdir()) == []


def test_a_burst_into_one_series_costs_one_directory_fsync_not_one_each(tmp_path, monkeypatch):
    # The settler lets written slots gather for settle_delay_s: one fsync of the series directory names them
    # all (a device flush saved per instance). Counted by wrapping the real fsync_dir.
    from storage import slots

    synced: list[Path] = []
    real = slots.fsync_dir

    def counting(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(slots, "fsync_dir", counting)
    files = FileStore(tmp_path)
    first = files.write_instance(STUDY, SERIES, "1.20", b"first")  # a new series: three directories
    for i in range(1, 20):
        files.write_instance(STUDY, SERIES, f"1.20.{i}", b"burst %d" % i)
    files.close()
    series_syncs = [p for p in synced if p == first.path.parent]
    assert 1 <= len(series_syncs) <= 3, f"{len(series_syncs)} fsyncs of the series directory for 20 instances"
    assert pending_slots(files) == [] and list(files.tmp.iterdir()) == []
