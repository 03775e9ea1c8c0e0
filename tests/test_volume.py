"""Loading a series as a volume: sorting, rescaling, geometry, and the refusals the SR reports."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from models.volume import VolumeRefused, build_volume
from simulator.studies import simulate_study


@pytest.fixture(scope="module")
def ct_slices():
    return simulate_study("head-cta", "ge-revolution-standard", seed=11, size="test").datasets


def test_volume_is_sorted_along_the_normal_and_in_hu(ct_slices):
    shuffled = list(reversed(ct_slices))
    vol = build_volume(shuffled)
    z = [float(ds.ImagePositionPatient[2]) for ds in vol.datasets]
    assert z == sorted(z)
    assert vol.values.dtype == np.float32 and vol.values.shape[0] == len(ct_slices)
    assert -1100 < vol.values.min() < -900  # air in HU, after rescale
    k, j, i = 5, 10, 20
    p = vol.geometry.index_to_patient((k, j, i))
    back = vol.geometry.patient_to_index(p)
    assert np.allclose(back, (k, j, i))
    assert np.allclose(
        vol.geometry.index_to_patient((k, 0, 0)), [float(v) for v in vol.datasets[k].ImagePositionPatient]
    )


def _mutate(slices, fn):
    out = [copy.deepcopy(ds) for ds in slices]
    fn(out)
    return out


@pytest.mark.parametrize(
    "mutation, reason",
    [
        (lambda s: s.__delitem__(slice(1, None)), "at least"),
        (lambda s: s[3].__setattr__("ImageOrientationPatient", [0, 1, 0, 0, 0, -1]), "mixed orientations"),
        (lambda s: s.__delitem__(10), "uneven"),
        (lambda s: [ds.__delattr__("PixelSpacing") for ds in s], "PixelSpacing"),
        (lambda s: [ds.__setattr__("PixelSpacing", [0, 0]) for ds in s], "PixelSpacing"),
        (lambda s: [ds.__setattr__("ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]) for ds in s], "localizer"),
        (lambda s: s.append(copy.deepcopy(s[0])), "share a position"),
    ],
    ids=["single-slice", "mixed-orientation", "gap", "no-spacing", "zero-spacing", "localizer", "duplicate"],
)
def test_refusals_say_why(ct_slices, mutation, reason):
    with pytest.raises(VolumeRefused, match=reason):
        build_volume(_mutate(ct_slices, mutation))


@pytest.mark.peers
def test_harmonized_derived_series_passes_dciodvfy(ct_slices, tmp_path):
    from handlers.results.derived import derived_series
    from peers import dciodvfy_errors

    derived = derived_series(ct_slices[:2], None, "identity (identity) for CT|test")
    for i, ds in enumerate(derived):
        assert ds.SeriesInstanceUID != ct_slices[0].SeriesInstanceUID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == ct_slices[i].SOPInstanceUID
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
