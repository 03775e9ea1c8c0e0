"""Detector: patches, candidates, the network, shipped weights, checksum refusal, bad input, FROC bookkeeping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.candidates import SETTINGS, find_candidates, find_peaks, settings_for
from models.candidates_torch import find_peaks_torch
from models.detector import WEIGHTS_DIR, Detector, WeightsRefused, nms_3d
from models.findings import VolumeGeometry
from models.nets import MiniVGG, NetConfig
from models.patches import extract_patches, extract_views, normalise
from models.patches_torch import extract_views_torch
from models.training.evaluate import auc, froc_points
from models.training.train import train_classifier

SHIPPED = (WEIGHTS_DIR / "lesion.pt").exists()
needs_weights = pytest.mark.skipif(not SHIPPED, reason="no shipped weights in models/weights")


def geometry(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> VolumeGeometry:
    return VolumeGeometry((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), spacing, shape)


def phantom(spacing: tuple[float, float, float], shape: tuple[int, int, int], aneurysm_mm: float = 8.0) -> tuple:
    """A 3 mm bright tube along x with a spherical blob on it (CT HU), in a soft-tissue background."""
    k, j, i = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    cz, cy, cx = (np.asarray(shape) - 1) * np.asarray(spacing) / 2
    vol = np.full(shape, 40.0, np.float32)
    vol[(k - cz) ** 2 + (j - cy) ** 2 <= 1.5**2] = 400.0
    blob = np.array([cz, cy + 1.5 + aneurysm_mm / 2 - 1, cx])
    vol[(k - blob[0]) ** 2 + (j - blob[1]) ** 2 + (i - blob[2]) ** 2 <= (aneurysm_mm / 2) ** 2] = 380.0
    return vol, blob / np.asarray(spacing)


def test_patches_have_fixed_physical_size():
    fine, c_fine = phantom((0.5, 0.5, 0.5), (64, 64, 64))
    coarse, c_coarse = phantom((1.0, 1.0, 1.0), (32, 32, 32))
    p_fine = extract_patches(normalise(fine, "CT"), (0.5, 0.5, 0.5), c_fine[None], 24.0)
    p_coarse = extract_patches(normalise(coarse, "CT"), (1.0, 1.0, 1.0), c_coarse[None], 24.0)
    assert p_fine.shape == p_coarse.shape == (1, 3, 32, 32)
    assert np.corrcoef(p_fine.ravel(), p_coarse.ravel())[0, 1] > 0.9


def test_candidates_find_the_blob_on_the_tube():
    vol, centre = phantom((0.8, 0.8, 0.8), (48, 48, 48))
    cands = find_candidates(normalise(vol, "CT"), (0.8, 0.8, 0.8), "head")
    assert 0 < len(cands) <= SETTINGS["head"].max_candidates
    dist_mm = np.linalg.norm((cands.centres - centre) * 0.8, axis=1)
    assert dist_mm.min() < 3.0
    assert 4.0 < cands.diameters_mm[np.argmin(dist_mm)] < 14.0


def test_an_aneurysm_touching_bone_keeps_its_candidate():
    # ophthalmic / cavernous ICA aneurysms lie against the skull base: a wide bone margin would lose them
    vol, centre = phantom((0.8, 0.8, 0.8), (48, 48, 48), aneurysm_mm=6.0)
    j_bone = int(round(centre[1] + 3.0 / 0.8)) + 1  # a voxel beyond the blob's far surface
    vol[:, j_bone : j_bone + 6, :] = 1200.0
    cands = find_candidates(normalise(vol, "CT"), (0.8, 0.8, 0.8), "head")
    assert np.linalg.norm((cands.centres - centre) * 0.8, axis=1).min() < 3.0


def test_a_bright_mra_aneurysm_is_not_taken_for_bone():
    # TOF: normalised by the 99.9th percentile, a large aneurysm's inflow can sit far above the vessels
    vol, centre = phantom((0.8, 0.8, 0.8), (48, 48, 48), aneurysm_mm=6.0)
    mr = np.where(vol > 390, 1.0, np.where(vol > 300, 3.0, 0.1)).astype(np.float32)  # tube 1, aneurysm 3
    mm = [
        np.linalg.norm((find_candidates(mr, (0.8,) * 3, "head", m).centres - centre) * 0.8, axis=1)
        for m in ("CT", "MR")
    ]
    ct_dist, mr_dist = (d.min() if len(d) else np.inf for d in mm)  # as CT the blob would read as bone
    assert mr_dist < 3.0 and ct_dist > mr_dist


def test_tiny_model_overfits_a_few_patches():
    rng = np.random.default_rng(0)
    pos, neg = [], []
    for s in range(8):
        vol, centre = phantom((1.0, 1.0, 1.0), (32, 32, 32), aneurysm_mm=6.0 + s % 3)
        norm = normalise(vol + rng.normal(0, 20, vol.shape).astype(np.float32), "CT")
        pos.append(extract_patches(norm, (1, 1, 1), centre[None], 24.0))
        neg.append(extract_patches(norm, (1, 1, 1), np.array([[15.5, 15.5, 4.0 + s]]), 24.0))
    x = np.concatenate(pos + neg)
    y = np.array([1] * 8 + [0] * 8)
    model = MiniVGG(NetConfig(n_classes=2, width=4, hidden=16, dropout=0.0))
    history = train_classifier(model, x, y, epochs=25, seed=0, lr=5e-3, batch=8)
    with torch.inference_mode():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    assert history[-1] < history[0] / 3
    assert (pred == y).all()


def test_nms_keeps_the_best_of_a_cluster():
    pts = np.array([[0, 0, 0], [1, 0, 0], [20, 0, 0]], float)
    keep = nms_3d(pts, np.array([0.6, 0.9, 0.7]), np.array([5.0, 5.0, 5.0]))
    assert keep.tolist() == [1, 2]


def test_froc_and_auc_bookkeeping():
    # case 1: lesion found at 0.9, an FP at 0.8; case 2: an FP at 0.95, lesion found at 0.3
    studies = [(np.array([0.9, 0.8]), np.array([[1], [0]]), 1), (np.array([0.95, 0.3]), np.array([[0], [1]]), 1)]
    sens = froc_points(studies)
    # read as LUNA16 reads it: at the grid point nearest 0.5 (0.49985) and 1 (0.99975), just before each FP
    assert sens["0.5"] == 0.0 and sens["1"] == 0.5 and sens["4"] == 1.0
    assert auc(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 0])) == 1.0
    assert auc(np.array([0.1, 0.8]), np.array([1, 0])) == 0.0


def test_sensitivity_by_lesion_size():
    from models.training.evaluate import sensitivity_by_size

    # study 1: a 2 mm lesion found at 0.9 and a 12 mm one only at 0.4; study 2: a 4 mm lesion with no finding
    studies = [
        (np.array([0.9, 0.4, 0.95]), np.array([[1, 0], [0, 1], [0, 0]]), np.array([2.0, 12.0])),
        (np.array([0.7]), np.array([[0]]), np.array([4.0])),
    ]
    bins = sensitivity_by_size(studies, threshold=0.5)
    assert bins == {
        "<3 mm": {"lesions": 1, "found": 1, "sensitivity": 1.0},
        "3-5 mm": {"lesions": 1, "found": 0, "sensitivity": 0.0},
        ">=10 mm": {"lesions": 1, "found": 0, "sensitivity": 0.0},
    }
    assert sensitivity_by_size(studies, threshold=0.3)[">=10 mm"]["found"] == 1


@needs_weights
def test_shipped_weights_find_the_aneurysm_on_a_small_simulated_study():
    from models.volume import build_volume
    from simulator.studies import simulate_study

    # the "eval" size (0.85 × 1 mm) the thresholds are calibrated at; tests/test_pipeline.py reads a "test" one
    study = simulate_study("head-cta", "ge-revolution-standard", 7, "eval", lesion_diameters_mm=[9.0])
    volume = build_volume(study.datasets)
    detector = Detector.load(device="cpu")
    detection = detector.detect(volume.values, volume.geometry, "CT", "head")
    assert detection.analysed and detection.task == "aneurysm"
    truth = np.asarray(study.truth["lesions"][0]["center_mm"])
    dist = [np.linalg.norm(np.asarray(f.center_mm) - truth) for f in detection.findings]
    assert dist and min(dist) < 6.0, (dist, [f.probability for f in detection.findings])
    assert len(detection.findings) <= 6


@needs_weights
def test_chest_patches_are_read_as_the_mean_of_four_views():
    detector = Detector.load(device="cpu")
    assert detector.tta == {"head": 1, "chest": 4}
    x = np.random.default_rng(5).normal(0, 1, (16, 3 * len(detector.views), 32, 32)).astype(np.float32)
    views = [x, x[..., ::-1], x[..., ::-1, :], x.transpose(0, 1, 3, 2)]
    expected = np.mean([detector.classify(np.ascontiguousarray(v)) for v in views], axis=0)
    assert np.allclose(detector.classify(x, tta=4, floor=0), expected, atol=1e-5)
    assert not np.allclose(detector.classify(x, tta=4, floor=0), detector.classify(x), atol=1e-4)


@needs_weights
def test_only_patches_above_the_floor_are_read_in_every_flip():
    # the flip cascade: a full reading where the first one reaches the floor, the first reading elsewhere
    detector = Detector.load(device="cpu")
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (64, 3 * len(detector.views), 32, 32)).astype(np.float32)
    x *= rng.uniform(0.2, 3.0, (64, 1, 1, 1)).astype(np.float32)  # a spread of probabilities
    first, full = detector.classify(x), detector.classify(x, tta=4, floor=0)
    floor = float(np.median(first))
    above = first >= floor
    assert 0 < above.sum() < len(x)
    assert not np.allclose(first, full, atol=1e-4)
    cascade = detector.classify(x, tta=4, floor=floor)
    np.testing.assert_allclose(cascade[above], full[above], atol=1e-6)
    np.testing.assert_array_equal(cascade[~above], first[~above])


@needs_weights
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (this machine has no GPU)")
def test_cuda_mixed_precision_agrees_with_cpu():
    """The GPU path (fp16 autocast) scores the same patches as the CPU path, within fp16 rounding."""
    cpu_detector = Detector.load(device="cpu")
    x = np.random.default_rng(3).normal(0, 1, (512, 3 * len(cpu_detector.views), 32, 32)).astype(np.float32)
    cpu = cpu_detector.classify(x)
    gpu = Detector.load(device="cuda").classify(x)
    assert np.max(np.abs(cpu - gpu)) < 0.02


def flip_one_bit(path: Path) -> None:
    """Tamper with a file: one bit in its middle."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def copy_shipped_weights(folder: Path) -> None:
    """The shipped card and every network it names, copied to ``folder``."""
    card = json.loads((WEIGHTS_DIR / "lesion.json").read_text())
    for name in ("lesion.pt", "lesion.json", *(m["file"] for m in card.get("members", []))):
        shutil.copy(WEIGHTS_DIR / name, folder / name)


def assert_refused(folder: Path, match: str) -> None:
    """Loading the detector from ``folder`` is refused with a reason matching ``match``."""
    with pytest.raises(WeightsRefused, match=match):
        Detector.load(device="cpu", weights_dir=folder)


@needs_weights
def test_tampered_weights_are_refused(tmp_path: Path):
    copy_shipped_weights(tmp_path)
    Detector.load(device="cpu", weights_dir=tmp_path)  # intact copy loads
    flip_one_bit(tmp_path / "lesion.pt")
    assert_refused(tmp_path, "sha256")
    (tmp_path / "lesion.json").unlink()
    assert_refused(tmp_path, "card")


@needs_weights
def test_every_ensemble_member_is_checked_and_averaged(tmp_path: Path):
    copy_shipped_weights(tmp_path)
    detector = Detector.load(device="cpu", weights_dir=tmp_path)
    assert len(detector.models) == 3  # the shipped card names two further networks
    channels = 3 * len(detector.views)
    x = np.random.default_rng(0).normal(0.0, 0.5, size=(16, channels, 32, 32)).astype(np.float32)
    single = [Detector(m, detector.card, torch.device("cpu")).classify(x) for m in detector.models]
    np.testing.assert_allclose(detector.classify(x), np.mean(single, axis=0), atol=1e-5)
    flip_one_bit(tmp_path / "lesion-b.pt")
    assert_refused(tmp_path, "lesion-b.pt have sha256")
    (tmp_path / "lesion-b.pt").unlink()
    assert_refused(tmp_path, "missing")
    card = json.loads((tmp_path / "lesion.json").read_text())
    card["members"][0]["file"] = "../lesion.pt"
    (tmp_path / "lesion.json").write_text(json.dumps(card))
    assert_refused(tmp_path, "invalid member")


@pytest.fixture(scope="module")
def untrained_detector() -> Detector:
    card = {"version": "test", "threshold": 0.5, "patch_mm": {"head": 24.0, "chest": 48.0}}
    return Detector(MiniVGG(NetConfig()), card, torch.device("cpu"))


@pytest.mark.parametrize(
    ("shape", "spacing", "modality", "body", "reason"),
    [
        ((4, 64, 64), (1.0, 1.0, 1.0), "CT", "head", "too small for a patch"),
        ((20, 20, 20), (1.0, 1.0, 1.0), "CT", "head", "too small for a patch"),
        ((64, 64, 64), (5.0, 0.5, 0.5), "CT", "head", "anisotropic"),
        ((64, 64, 64), (1.0, 1.0, 1.0), "MR", "chest", "MR series cannot go to the chest CT model"),
        ((64, 64, 64), None, "CT", "head", "no voxel spacing"),
    ],
)
def test_bad_input_is_not_analysed_with_a_reason(untrained_detector, shape, spacing, modality, body, reason):
    values = np.zeros(shape, np.float32)
    geom = geometry(shape, spacing) if spacing is not None else None
    detection = untrained_detector.detect(values, geom, modality, body)
    assert not detection.analysed
    assert reason in detection.reason
    assert detection.findings == []


def test_a_plain_series_is_analysed_by_an_untrained_model(untrained_detector):
    vol, _ = phantom((1.0, 1.0, 1.0), (40, 48, 48))
    detection = untrained_detector.detect(vol, geometry(vol.shape, (1.0, 1.0, 1.0)), "CT", "head")
    assert detection.analysed and detection.n_candidates > 0
    assert all(f.kind == "aneurysm" for f in detection.findings)


def test_training_subjects_can_carry_more_lesions():
    # `harmonode train lesions --lesions-per-study N`: more positives per simulated subject (simulation is the cost)
    from models.training.data import simulated

    default = simulated("head-cta", "siemens-force-br40", 20_001, "test")
    four = simulated("head-cta", "siemens-force-br40", 20_001, "test", n_lesions=4)
    assert 1 <= len(default.truth["lesions"]) <= 3
    assert len(four.truth["lesions"]) == 4
    assert len({les["site"] for les in four.truth["lesions"]}) == 4  # four different places on the tree


def test_rescan_augmentation_changes_noise_and_sharpness_not_anatomy():
    # `train lesions --rescan`: a CT study rescanned through a random kernel and dose; truth and geometry stay
    import scipy.ndimage as ndi

    from models.training.data import RESCAN, rescanned, simulated

    study = simulated("head-cta", "siemens-force-br40", 20_002, "test")
    first = rescanned(study, np.random.default_rng(3))
    again = rescanned(study, np.random.default_rng(3))
    other = rescanned(study, np.random.default_rng(4))
    np.testing.assert_array_equal(first.values, again.values)  # deterministic in the generator
    assert not np.array_equal(first.values, other.values)
    assert first.truth == study.truth and first.geometry == study.geometry
    assert first.values.shape == study.values.shape and first.values.dtype == np.float32

    def noise_hu(values: np.ndarray) -> float:
        brain = (values > 20) & (values < 60)  # parenchyma, away from vessels and bone
        return float((values - ndi.gaussian_filter(values, 1.0))[brain].std())

    noise = [noise_hu(rescanned(study, np.random.default_rng(s)).values) for s in range(6)]
    assert max(noise) > 1.2 * noise_hu(study.values)  # some rescans are noisier (low dose, sharp kernel) …
    assert max(noise) > 1.3 * min(noise)  # … and they differ from one another
    assert max(noise) < noise_hu(study.values) + 3 * RESCAN["noise_hu"][1]
    smooth = [ndi.gaussian_filter(v, 2.0).ravel() for v in (study.values, first.values)]
    assert np.corrcoef(*smooth)[0, 1] > 0.99  # the same anatomy at the same HU
    mra = simulated("head-mra", "siemens-skyra-3t-tof", 20_003, "test")
    assert rescanned(mra, np.random.default_rng(0)) is mra  # MR is left as it is


# -- further views and fine candidates (card 1.3) -------------------------------------------------------------------
def test_views_add_three_channels_each_on_the_same_axes():
    vol, centre = phantom((0.5, 0.5, 0.5), (64, 64, 64))
    norm = normalise(vol, "CT")
    spacing = (0.5, 0.5, 0.5)
    out = extract_views(norm, spacing, centre[None], 24.0, ("planes", "zoom", "mip", "wide"))
    assert out.shape == (1, 12, 32, 32)
    assert np.array_equal(out[:, :3], extract_patches(norm, spacing, centre[None], 24.0))
    assert np.array_equal(out[:, 3:6], extract_patches(norm, spacing, centre[None], 12.0))
    assert np.all(out[:, 6:9] >= out[:, :3] - 1e-6)  # a slab's maximum includes the plane through the point
    assert np.array_equal(out[:, 9:], extract_patches(norm, spacing, centre[None], 48.0))
    with pytest.raises(ValueError, match="unknown patch views"):
        extract_views(norm, spacing, centre[None], 24.0, ("planes", "mpr"))


def test_a_sac_beside_the_plane_shows_in_the_mip_view_only():
    # a 2 mm sac 2 mm above the axial plane through the candidate: the plane misses it, the slab maximum does not
    spacing = (0.5, 0.5, 0.5)
    vol = np.full((64, 64, 64), 40.0, np.float32)
    k, j, i = np.meshgrid(*[np.arange(64) * 0.5] * 3, indexing="ij")
    vol[(k - 18.0) ** 2 + (j - 16.0) ** 2 + (i - 16.0) ** 2 <= 1.0] = 400.0
    centre = np.array([[32.0, 32.0, 32.0]])  # 16 mm: the sac's centre is 2 mm along k
    planes, mip = np.split(extract_views(normalise(vol, "CT"), spacing, centre, 24.0, ("planes", "mip")), 2, axis=1)
    assert planes[0, 0].max() < 0.2 < 0.9 < mip[0, 0].max()  # axial channel: background vs the sac (1.0)


def test_widened_network_starts_as_the_pretrained_one():
    torch.manual_seed(0)
    net = MiniVGG(NetConfig(n_classes=4)).eval()
    x = torch.randn(5, 3, 32, 32)
    before = net(x)
    net.widen_input(9)
    assert net.config.in_channels == 9 and net.features[0][0].weight.shape[1] == 9
    wide = torch.cat([x, torch.randn(5, 6, 32, 32) * 0], dim=1)
    assert torch.allclose(net(wide), before, atol=1e-6)
    with pytest.raises(ValueError, match="narrow"):
        net.widen_input(3)


def test_fine_candidates_are_appended_away_from_the_others():
    vol, _ = phantom((0.8, 0.8, 0.8), (48, 48, 48), aneurysm_mm=3.0)
    norm = normalise(vol, "CT")
    base = find_candidates(norm, (0.8,) * 3, "head")
    settings = settings_for("head", 5)
    more = find_candidates(norm, (0.8,) * 3, "head", settings=settings)
    assert base.fine == 0 and 0 < more.fine <= 5 and len(more) == len(base) + more.fine
    assert np.array_equal(more.centres[: len(base)], base.centres)  # the usual candidates first, unchanged
    extra = more.centres[len(base) :]
    gap = np.abs(extra[:, None] - base.centres[None]).max(axis=2).min(axis=1) * 0.8  # box distance, mm
    assert np.all(gap > 1.5)


def test_the_card_names_the_views_its_networks_read():
    card = {"version": "test", "threshold": 0.5, "views": ["planes", "mip"], "fine_candidates": {"head": 20}}
    detector = Detector(MiniVGG(NetConfig(in_channels=6)), card, torch.device("cpu"))
    vol, _ = phantom((1.0, 1.0, 1.0), (40, 48, 48))
    cands, probs = detector.score(vol, geometry(vol.shape, (1.0, 1.0, 1.0)), "CT", "head")
    assert len(probs) == len(cands) > 0 and detector.candidate_settings["head"].fine_candidates == 20
    with pytest.raises(ValueError, match="channels"):
        Detector(MiniVGG(NetConfig()), card, torch.device("cpu"))  # 3-channel network, 6-channel card
    with pytest.raises(ValueError, match="unknown patch views"):
        Detector(MiniVGG(NetConfig()), {**card, "views": ["slab"]}, torch.device("cpu"))


def noisy_phantom(body: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Head: the tube-and-sac phantom with noise (many peaks, near-ties). Chest: air in a body wall with
    a dozen soft-tissue balls (nodules) and noise, at the chest's working spacing."""
    rng = np.random.default_rng(1)
    if body == "head":
        vol, _ = phantom((0.8, 0.8, 0.8), (48, 48, 48), aneurysm_mm=4.0)
        return vol + rng.normal(0, 30, vol.shape).astype(np.float32), (0.8, 0.8, 0.8)
    vol = np.full((40, 48, 48), -850.0, np.float32)
    vol[:, :3], vol[:, -3:], vol[:, :, :3], vol[:, :, -3:] = 40.0, 40.0, 40.0, 40.0
    k, j, i = np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij")
    for centre in rng.uniform(8, 32, size=(12, 3)):
        vol[(k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= rng.uniform(1, 9)] = 40.0
    return vol + rng.normal(0, 40, vol.shape).astype(np.float32), (2.5, 2.5, 2.5)


@pytest.mark.parametrize(("body", "fine"), [("head", 10), ("chest", 0)])
def test_torch_candidates_equal_scipy_candidates(body, fine):
    # the GPU path (models.candidates_torch) runs the same filters in torch; here on the CPU, result for result
    vol, spacing = noisy_phantom(body)
    cfg = settings_for(body, fine)
    work = normalise(vol, "CT")
    cpu = find_peaks(work.copy(), np.asarray(spacing), cfg, body, True)
    gpu_path = find_peaks_torch(work.copy(), np.asarray(spacing), cfg, body, True, "cpu")
    assert len(cpu[0]) > 5 and cpu[3] == gpu_path[3] and (fine == 0 or cpu[3] > 0)
    assert np.array_equal(cpu[0], gpu_path[0])
    assert np.allclose(cpu[1], gpu_path[1], rtol=1e-4, atol=1e-5) and np.array_equal(cpu[2], gpu_path[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (this machine has no GPU)")
@pytest.mark.parametrize("body", ["head", "chest"])
def test_cuda_candidates_equal_cpu_candidates(body):
    vol, spacing = noisy_phantom(body)
    cpu = find_candidates(normalise(vol, "CT"), spacing, body)
    gpu = find_candidates(normalise(vol, "CT"), spacing, body, device="cuda")
    assert len(cpu) > 5 and np.array_equal(cpu.centres, gpu.centres)
    assert np.allclose(cpu.scores, gpu.scores, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_patches_equal_scipy_patches(threads):
    # the detector's path (models.patches_torch) samples the same points with grid_sample; on the CPU its chunks
    # of candidates go to several threads, which must each fill their own rows
    from models.patches_torch import CPU_CHUNK

    rng = np.random.default_rng(0)
    vol = rng.normal(size=(40, 50, 60)).astype(np.float32)
    n = 2 * CPU_CHUNK + 17  # three chunks, the last one short
    centres = rng.uniform(-5, 55, size=(n, 3))  # some near or beyond the edges
    views = ("planes", "zoom", "mip", "wide")
    reference = extract_views(vol, (0.7, 0.5, 0.6), centres, 24.0, views)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = extract_views(vol, (0.7, 0.5, 0.6), centres, 24.0, views, device="cpu")
    finally:
        torch.set_num_threads(before)
    assert reference.shape == fast.shape == (n, 12, 32, 32)
    assert np.abs(reference - fast).max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (this machine has no GPU)")
def test_cuda_patches_equal_cpu_patches():
    vol, centre = phantom((0.5, 0.5, 0.5), (64, 64, 64))
    centres = centre[None] + np.random.default_rng(2).normal(0, 6, (64, 3))
    views = ("planes", "zoom", "mip")
    cpu = extract_views(normalise(vol, "CT"), (0.5,) * 3, centres, 24.0, views)
    gpu = extract_views_torch(normalise(vol, "CT"), (0.5,) * 3, centres, 24.0, views, "cuda")
    assert np.abs(cpu - gpu).max() < 1e-3


def test_training_samples_carry_the_views_and_fine_candidates_asked_for():
    # `harmonode train lesions --views planes,mip --fine-candidates 20`: what the network and the card will read
    from models.training.data import lesion_samples, simulated

    study = simulated("head-cta", "siemens-force-br40", 20_002, "eval", n_lesions=2)
    x1, y1 = lesion_samples(study, np.random.default_rng(0))
    x2, y2 = lesion_samples(study, np.random.default_rng(0), views=("planes", "mip"), fine_candidates=20)
    assert x1.shape[1:] == (3, 32, 32) and x2.shape[1:] == (6, 32, 32)
    assert y2.sum() >= y1.sum() >= 16  # 8 jittered copies of each lesion, plus candidates on them
    assert 0 < len(y2) - len(y1) <= 20  # the fine-scale extras (positive where on a lesion)
    assert np.all(x2[:, 3:] >= x2[:, :3] - 1e-2)  # a slab's maximum is at least its middle plane (float16)


def test_findings_are_matched_to_lesions_after_nms():
    from models.training.evaluate import findings_on_lesions

    mm = np.array([[0.0, 0, 0], [2.0, 0, 0], [50.0, 0, 0], [0.0, 30, 0]])  # two on lesion 0, one far, one on 1
    probs = np.array([0.9, 0.8, 0.7, 0.1])
    lesions = [
        {"center_mm": [1.0, 0, 0], "diameter_mm": 3.0},
        {"center_mm": [0.0, 34, 0], "diameter_mm": 2.0},  # 4 mm away: within max(1, 3) + 1.5
        {"center_mm": [0.0, 0, 90], "diameter_mm": 5.0},  # no candidate near
    ]
    from models.training.hits import REACH

    keep, hits, with_candidate = findings_on_lesions(mm, probs, np.full(4, 3.0), "head", lesions, REACH)
    assert list(keep) == [0, 2, 3]  # the 0.8 two millimetres from the 0.9 is suppressed (6 mm head radius)
    assert hits.tolist() == [[True, False, False], [False, False, False], [False, True, False]]
    assert with_candidate == 2


def test_one_finding_within_reach_of_two_lesions_finds_both():
    from models.training.evaluate import findings_on_lesions, sensitivity_by_size

    # two aneurysms whose centres are 2 mm apart (a pcomm origin beside an ICA terminus): one mark covers both,
    # as the LUNA16 evaluation counts a CAD mark inside two nodules; a far false positive scores in between
    mm = np.array([[1.0, 0, 0], [40.0, 0, 0]])
    lesions = [{"center_mm": [0.0, 0, 0], "diameter_mm": 6.0}, {"center_mm": [2.0, 0, 0], "diameter_mm": 2.5}]
    keep, hits, with_candidate = findings_on_lesions(mm, np.array([0.9, 0.5]), np.full(2, 3.0), "head", lesions)
    assert list(keep) == [0, 1] and hits.tolist() == [[True, True], [False, False]] and with_candidate == 2
    from models.training.evaluate import hit_reach, lesion_hits, within_lesion

    assert lesion_hits(mm[keep], lesions, within_lesion).tolist() == [[True, True], [False, False]]  # in both sacs
    beside = np.array([[5.0, 0, 0]])  # 3 mm from the small sac's centre: within its 4.5 mm reach, in neither sac
    assert lesion_hits(beside, lesions, hit_reach).tolist() == [[False, True]]
    assert lesion_hits(beside, lesions, within_lesion).tolist() == [[False, False]]
    study = (np.array([0.9, 0.5]), hits, 2)
    assert froc_points([study], fp_rates=(0.5, 1)) == {"0.5": 1.0, "1": 1.0}
    assert sensitivity_by_size([(study[0], hits, np.array([6.0, 2.5]))], threshold=0.8) == {
        "<3 mm": {"lesions": 1, "found": 1, "sensitivity": 1.0},
        "5-10 mm": {"lesions": 1, "found": 1, "sensitivity": 1.0},
    }


def test_the_head_kinds_can_train_on_more_subjects_than_the_chest():
    from models.training.data import lesion_training_plan

    plan = lesion_training_plan(40, 20000, "eval", test_size_studies=2, head_studies=400)
    eval_size = [(kind, seed) for kind, _, seed, size in plan if size == "eval"]
    counts = {k: sum(1 for kind, _ in eval_size if kind == k) for k in ("head-cta", "head-mra", "chest-ct")}
    assert counts == {"head-cta": 400, "head-mra": 400, "chest-ct": 40}
    assert max(s for k, s in eval_size if k == "head-mra") == 21399  # kind k from base + 1000 k
    test_seeds = {seed for _, _, seed, size in plan if size == "test"}
    assert test_seeds == {20500, 20501, 21500, 21501, 22500, 22501}
    assert not test_seeds & {seed for _, seed in eval_size}  # no subject twice
    with pytest.raises(ValueError, match="at most 500"):
        lesion_training_plan(40, 20000, head_studies=501)
