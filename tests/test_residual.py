"""The residual stage (seed 003): the seed's arithmetic, cached maps, refusals, weights, and the pipeline."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydicom import dcmread

from builders import encoded
from handlers.store import store_encoded
from models.detector import WeightsRefused
from models.findings import VolumeGeometry
from models.nets import ResidualNetConfig, ResidualUNet
from models.residual import ResidualRefused, central_slices, check_takes, descriptors, residual_stage, scale_of
from models.residual_net import MapNet, ResidualModel, as_parts
from models.training.residual import ResidualRecipe, train_residual
from node.config import PipelineConfig
from node.pipeline import DetectorSlot, ResidualSlot, Worker, condition_key, run_series
from rules.registry import RuleRegistry
from rules.strengths import (
    FlatNoise,
    ResidualStage,
    RicianNoise,
    SignalDependentNoise,
    StageError,
    apply_strengths,
    noise_model_for,
    noise_ratio,
)
from simulator.pairs import ct_pair, mr_pair, named_pair, random_ct_condition
from simulator.studies import simulate_study
from storage.maps import MapCache
from storage.store import Store, open_store

VERSION = "residual-test-1"


def tiny_model(seed: int = 0, width: int = 4) -> ResidualModel:
    torch.manual_seed(seed)
    nets = {m: ResidualUNet(ResidualNetConfig(width=width)) for m in ("CT", "MR")}
    return ResidualModel(nets, {"version": VERSION}, torch.device("cpu"))


def geometry(n: int, spacing: float = 0.7) -> VolumeGeometry:
    return VolumeGeometry(
        origin=(0.0, 0.0, 0.0), row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 1.0, 0.0),
        spacing=(1.0, spacing, spacing), shape=(n, 32, 32),
    )


# -- the seed's arithmetic -----------------------------------------------------------------------------------
def test_the_output_is_the_seeds_formula() -> None:
    rng = np.random.default_rng(1)
    x, rb, rn = (rng.normal(100, 30, (3, 16, 16)).astype(np.float32) for _ in range(3))
    model = SignalDependentNoise(k1=0.5, k0=4.0)
    out = apply_strengths(x, rb, rn, 0.3, 0.8, model)
    mid = x + 0.3 * rb
    ratio = np.sqrt(np.maximum(0.5 * (mid + rn) + 4.0, 0)) / np.sqrt(np.maximum(0.5 * (x + rn) + 4.0, 0))
    np.testing.assert_allclose(out, mid + 0.8 * rn * ratio, rtol=1e-5, atol=1e-4)
    assert not np.allclose(ratio, 1.0)  # the per-pixel rescale matters for this noise model


def test_flat_ct_noise_leaves_the_noise_map_as_it_is() -> None:
    x = np.linspace(-1000, 1500, 64, dtype=np.float32).reshape(1, 8, 8)
    assert float(noise_ratio(x, x + 50, np.zeros_like(x), FlatNoise(12.0))) == 1.0
    np.testing.assert_array_equal(apply_strengths(x, x * 0 + 5, x * 0 + 2, 1.0, 0.5, FlatNoise(9.0)), x + 5 + 1)


def test_rician_std_is_0655_sigma_at_zero_and_sigma_far_above() -> None:
    std = RicianNoise(10.0).std(np.array([0.0, 1000.0], dtype=np.float32))
    assert std[0] == pytest.approx(10.0 * math.sqrt(2 - math.pi / 2), rel=1e-3)  # 0.655 σ
    assert std[1] == pytest.approx(10.0, rel=1e-3)
    rng = np.random.default_rng(0)
    mag = np.abs(30.0 + rng.normal(0, 10, 200_000) + 1j * rng.normal(0, 10, 200_000))
    assert RicianNoise(10.0).std(np.array([30.0]))[0] == pytest.approx(mag.std(), rel=0.02)


def test_a_stage_validates_its_strengths() -> None:
    assert ResidualStage.from_dict(ResidualStage(0.5, 0.25, "m1").as_dict()) == ResidualStage(0.5, 0.25, "m1")
    for bad in ({"alpha_blur": 3.0, "alpha_noise": 0.0, "model_version": "m"},
                {"alpha_blur": 0.0, "alpha_noise": float("nan"), "model_version": "m"},
                {"alpha_blur": 0.0, "alpha_noise": 0.0, "model_version": " "}, {"alpha_blur": 0.1}):
        with pytest.raises(StageError):
            ResidualStage.from_dict(bad)


# -- cached maps: a change of strength never runs the network ---------------------------------------------
def test_changing_alpha_reuses_the_cached_maps_and_gives_the_formula(tmp_path: Path) -> None:
    model, cache = tiny_model(), MapCache(tmp_path / "cache")
    values = named_pair("ge-optima-bone-lowdose", 1, slices=4, matrix=32).input
    key = ("1.2.3", "rabc@v1")
    outputs = {}
    for ab, an in ((0.5, 0.5), (1.0, 0.2), (0.0, 1.0)):
        outcome = residual_stage(values, geometry(4), "CT", ResidualStage(ab, an, VERSION), model, cache, key)
        assert outcome.applied and outcome.cached == ((ab, an) != (0.5, 0.5))
        outputs[ab, an] = outcome.values
    assert model.calls == 1
    maps = cache.get(*key, model.cache_tag)
    noise_model = noise_model_for("CT", maps.noise)
    for (ab, an), out in outputs.items():
        np.testing.assert_array_equal(out, apply_strengths(values, maps.blur, maps.noise, ab, an, noise_model))
    # another histogram rule is another input: its maps are computed afresh
    residual_stage(values, geometry(4), "CT", ResidualStage(1, 1, VERSION), model, cache, ("1.2.3", "rabc@v2"))
    assert model.calls == 2


def test_the_cache_drops_its_oldest_entries_and_unreadable_ones(tmp_path: Path) -> None:
    cache = MapCache(tmp_path / "c", max_bytes=3 * 2 * (2 * 32 * 32 * 2 + 128))
    a = np.ones((2, 32, 32), np.float32)
    for i in range(5):
        cache.put(f"s{i}", "r", "m", a * i, a)
    assert cache.get("s0", "r", "m") is None and cache.get("s4", "r", "m") is not None
    assert cache.size_bytes() <= cache.max_bytes
    entry = next(p for p in (tmp_path / "c").iterdir() if p.is_dir())
    (entry / "blur.npy").write_bytes(b"not an array")
    assert sum(cache.get(f"s{i}", "r", "m") is None for i in range(5)) >= 3
    assert not entry.exists()


# -- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "geo", "modality", "says"),
    [
        ((1, 32, 32), geometry(1), "CT", "3 slices"),
        ((4, 32, 32), None, "CT", "no pixel spacing"),
        ((4, 32, 32), geometry(4, spacing=3.5), "CT", "outside the trained"),
        ((4, 32, 32), geometry(4), "PT", "CT and MR"),
    ],
)
def test_series_the_network_cannot_take_are_refused_with_the_reason(shape, geo, modality, says) -> None:  # noqa: ANN001
    with pytest.raises(ResidualRefused, match=says):
        check_takes(np.zeros(shape, np.float32), geo, modality)
    outcome = residual_stage(np.zeros(shape, np.float32), geo, modality, ResidualStage(1, 1, VERSION),
                             tiny_model(), None, ("s", "r"))
    assert not outcome.applied and says in outcome.reason


def test_a_stage_fitted_for_another_model_is_not_applied() -> None:
    values = np.zeros((4, 32, 32), np.float32)
    outcome = residual_stage(values, geometry(4), "CT", ResidualStage(1, 1, "other"), tiny_model(), None, ("s", "r"))
    assert not outcome.applied and "refit" in outcome.reason and outcome.values is values


# -- training and weights -----------------------------------------------------------------------------------
def test_a_tiny_network_overfits_a_few_pairs() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pairs = [ct_pair(random_ct_condition(rng), rng, "head", 3, 48, 0.7) for _ in range(2)]
    pairs.append(mr_pair(random_ct_condition(rng).__class__("m", "MR", "s", "s", field_strength=3.0,
                                                             noise_fraction=0.03), rng, 3, 48, 0.7))
    x = torch.from_numpy(np.stack([p.input / 1000.0 for p in pairs]).astype(np.float32))
    y = torch.from_numpy(np.stack([np.stack([p.blur_residual[1], p.noise_residual[1]]) / 1000.0 for p in pairs]))
    net = ResidualUNet(ResidualNetConfig(width=8, descriptors=0))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = F.l1_loss(net(x), y.float())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("residual")
    train_residual(out, ResidualRecipe(steps_ct=3, steps_mr=2, batch=2, patch=32, crops_per_slab=2, width=4), "cpu")
    return out


def test_trained_weights_load_with_their_card(trained: Path) -> None:
    card = json.loads((trained / "residual.json").read_text())
    assert {"sha256", "training_data", "held_out", "recipe", "command", "device"} <= card.keys()
    assert set(card["held_out"]["figures"]) >= {"ge-optima-bone-lowdose", "ge-signa-1.5t-tof"}
    model = ResidualModel.load("cpu", trained)
    assert model.version == card["version"] and set(model.nets) == {"CT", "MR"}


def test_ct_noise_comes_from_its_own_network_and_blur_from_the_joint_one(trained: Path) -> None:
    card = json.loads((trained / "residual.json").read_text())
    assert card["networks"]["CT"] == [
        {"outputs": ["blur", "noise"], "used_for": ["blur"], "reads": "input"},
        {"outputs": ["noise"], "used_for": ["noise"], "reads": "input"},
    ]
    assert card["networks"]["MR"] == [{"outputs": ["blur", "noise"], "used_for": ["blur", "noise"], "reads": "input"}]
    model = ResidualModel.load("cpu", trained)
    joint, noise_only = (p.net for p in model.parts["CT"])
    values, d, x = _slab_of_noise()
    maps = model.maps(values, geometry(3), "CT")
    scale = np.float32(scale_of(values, "CT"))
    with torch.no_grad():
        assert np.allclose(maps.blur[0], joint(x, d)[0, 0].numpy() * scale, atol=1e-3)
        assert np.allclose(maps.noise[0], noise_only(x, d)[0, 0].numpy() * scale, atol=1e-3)
        assert not np.allclose(maps.noise[0], joint(x, d)[0, 1].numpy() * scale, atol=1e-3)


def _slab_of_noise() -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """A 3-slice CT volume, its descriptors and its first slab (edges repeated) in network units."""
    values = np.random.default_rng(3).normal(40, 30, (3, 32, 32)).astype(np.float32)
    scale = np.float32(scale_of(values, "CT"))
    d = torch.from_numpy(descriptors(central_slices(values), 0.7, scale))[None]
    return values, d, torch.from_numpy(values[[0, 0, 1]][None] / scale)


def test_a_blur_network_on_the_denoised_input_reads_the_input_plus_the_noise_map(tmp_path: Path) -> None:
    recipe = ResidualRecipe(steps_ct=2, steps_mr=0, batch=2, patch=32, crops_per_slab=2, width=4, ct_blur="denoised")
    card = train_residual(tmp_path, recipe, "cpu")
    assert card["version"].endswith("-dn") and "--ct-blur denoised" in card["command"]
    assert card["networks"]["CT"] == [
        {"outputs": ["noise"], "used_for": ["noise"], "reads": "input"},
        {"outputs": ["blur"], "used_for": ["blur"], "reads": "denoised"},
    ]
    model = ResidualModel.load("cpu", tmp_path)
    noise_net, blur_net = (p.net for p in model.parts["CT"])
    values, d, x = _slab_of_noise()
    maps = model.maps(values, geometry(3), "CT")
    scale = np.float32(scale_of(values, "CT"))
    with torch.no_grad():
        assert np.allclose(maps.noise[0], noise_net(x, d)[0, 0].numpy() * scale, atol=1e-3)
        denoised = torch.from_numpy((values + maps.noise)[[0, 0, 1]][None] / scale)
        assert np.allclose(maps.blur[0], blur_net(denoised, d)[0, 0].numpy() * scale, atol=1e-3)
        assert not np.allclose(maps.blur[0], blur_net(x, d)[0, 0].numpy() * scale, atol=1e-3)


def test_card_10_checkpoints_with_one_network_per_modality_still_load(tmp_path: Path) -> None:
    from models.detector import sha256_of
    from models.residual import NORMALISATION

    torch.manual_seed(0)
    net = ResidualUNet(ResidualNetConfig(width=4))
    entry = {"config": {k: v for k, v in vars(net.config).items() if k != "maps"}, "state_dict": net.state_dict()}
    torch.save({"nets": {"CT": entry}}, tmp_path / "residual.pt")
    digest = sha256_of(tmp_path / "residual.pt")
    card = {"version": "residual-1.0-old", "normalisation": NORMALISATION, "sha256": digest}
    (tmp_path / "residual.json").write_text(json.dumps(card))
    model = ResidualModel.load("cpu", tmp_path)
    assert [p.use for p in model.parts["CT"]] == [("blur", "noise")]
    assert model.cache_tag == f"residual-1.0-old@{card['sha256'][:12]}"


def test_networks_must_give_each_map_once() -> None:
    a = ResidualUNet(ResidualNetConfig(width=4))
    b = ResidualUNet(ResidualNetConfig(width=4, out_channels=1, maps=("noise",)))
    with pytest.raises(ValueError, match="once each"):
        as_parts([MapNet(a, ("blur", "noise")), MapNet(b, ("noise",))])
    with pytest.raises(ValueError, match="not among"):
        MapNet(b, ("blur",))
    with pytest.raises(ValueError, match="output channels"):
        ResidualNetConfig(out_channels=2, maps=("noise",))
    reads_denoised = ResidualUNet(ResidualNetConfig(width=4, out_channels=1, maps=("noise",), reads="denoised"))
    blur_only = ResidualUNet(ResidualNetConfig(width=4, out_channels=1, maps=("blur",)))
    with pytest.raises(ValueError, match="cannot give the noise map it reads"):
        as_parts([MapNet(blur_only, ("blur",)), MapNet(reads_denoised, ("noise",))])


def test_tampered_weights_are_refused(trained: Path, tmp_path: Path) -> None:
    for name in ("residual.pt", "residual.json"):
        (tmp_path / name).write_bytes((trained / name).read_bytes())
    blob = bytearray((tmp_path / "residual.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "residual.pt").write_bytes(bytes(blob))
    with pytest.raises(WeightsRefused, match="tampered"):
        ResidualModel.load("cpu", tmp_path)
    card = json.loads((trained / "residual.json").read_text())
    card["normalisation"]["CT"]["scale"] = 500.0
    (tmp_path / "residual.pt").write_bytes((trained / "residual.pt").read_bytes())
    (tmp_path / "residual.json").write_text(json.dumps(card))
    with pytest.raises(WeightsRefused, match="normalisation"):
        ResidualModel.load("cpu", tmp_path)
    (tmp_path / "residual.json").unlink()
    with pytest.raises(WeightsRefused, match="no model card"):
        ResidualModel.load("cpu", tmp_path)


# -- in the pipeline ----------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "node") as s:
        yield s


def _worker(store: Store, model: ResidualModel, tmp_path: Path, **settings) -> Worker:  # noqa: ANN003
    def no_weights(device: str) -> None:
        raise FileNotFoundError("no detector weights in this test")

    return Worker(
        store.files, store.index, store.queue, PipelineConfig(**settings), (), DetectorSlot(loader=no_weights),
        ResidualSlot(loader=lambda device: model), MapCache(tmp_path / "maps"),
    )


def _texts(ds) -> list[str]:  # noqa: ANN001
    """Every TextValue of an SR's content tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out += _texts(item)
    return out


def _receive(store: Store, datasets) -> str:  # noqa: ANN001
    for ds in datasets:
        store_encoded(encoded(ds), str(ds.file_meta.TransferSyntaxUID), "", "", store.files, store.index)
    return str(datasets[0].SeriesInstanceUID)


@pytest.mark.parametrize("spacing", [1.75, 2.4])
def test_the_pipeline_runs_both_stages_or_says_why_not(store: Store, tmp_path: Path, spacing: float) -> None:
    """A series the network cannot take (here: pixels coarser than it was trained on) keeps the histogram
    stage's values, and its SR says why (series the node cannot make a volume of are refused before)."""
    study = simulate_study(
        "head-cta", "ge-optima-bone-lowdose", seed=5, size="test", slices=10, matrix=64, spacing_mm=spacing
    )
    uid = _receive(store, study.datasets)
    registry = RuleRegistry(store.index.db, store.index.lock)
    key = condition_key(json.loads(store.index.series(uid)["condition_tags"]), "CT")
    registry.add(key, "seed", {"a": 1.0, "b": 0.0, "c": 5000.0}, activate=True,
                 residual=ResidualStage(0.8, 0.6, VERSION))
    model = tiny_model()
    outcome = run_series(_worker(store, model, tmp_path, write_harmonized_series=True), uid)
    assert "residual" in outcome.timings
    sr = [r for r in outcome.results if r.sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88")]
    text = "\n".join(_texts(dcmread(store.files.abspath(sr[0].path))))
    assert "histogram rule" in text
    derived = [r for r in outcome.results if r.sop_class_uid == study.datasets[0].SOPClassUID]
    assert len(derived) == 10
    if spacing < 2.0:
        assert outcome.residual.applied and model.calls == 1
        assert "residual alpha_blur=0.80 alpha_noise=0.60" in text
        assert "residual alpha_blur=0.80" in str(dcmread(store.files.abspath(derived[0].path)).DerivationDescription)
    else:
        assert not outcome.residual.applied and model.calls == 0
        assert "residual stage not applied: pixel spacing 2.40 × 2.40 mm is outside the trained" in text


def test_the_evaluation_proposes_a_stage_per_condition_and_reads_studies_through_it() -> None:
    from models.training.data import simulated
    from models.training.residual_eval import residual_plan, with_residual

    model = tiny_model()
    plan = residual_plan(model, [("head-cta", "ge-optima-bone-lowdose"), ("head-cta", "ge-revolution-standard")],
                         "test", None)
    stage = plan.stage_for("head-cta", "ge-optima-bone-lowdose")
    assert stage is not None and stage.model_version == VERSION
    assert plan.stage_for("head-cta", "ge-revolution-standard") is None  # the reference: nothing to bring to it
    figures = plan.proposals["head-cta"]["ge-optima-bone-lowdose"]
    assert {"noise_before", "noise_after", "edge_before", "edge_after"} <= figures.keys()
    study = simulated("head-cta", "ge-optima-bone-lowdose", 3, "test")
    through = with_residual(study, plan)
    assert through.values.shape == study.values.shape
    assert (stage.alpha_blur == 0 and stage.alpha_noise == 0) or not np.array_equal(through.values, study.values)


def test_proposed_strengths_reach_the_reference_and_leave_an_ineffective_map_at_zero() -> None:
    from rules.strengths import Sample, propose_strengths

    rng = np.random.default_rng(2)
    noise = rng.normal(0, 40, (2, 64, 64)).astype(np.float32)
    base = np.full((2, 64, 64), 40.0, np.float32)
    sample = Sample(base + noise, np.zeros_like(base), -noise, (0.7, 0.7), "CT")

    def spread(image: np.ndarray, spacing_mm: tuple, modality: str) -> float:  # noqa: ARG001
        return float(np.std(image))

    proposal = propose_strengths([sample], 10.0, 1.0, spread, lambda image, **_: 1.2)
    assert proposal.alpha_blur == 0.0  # the blur map moves nothing: no strength is proposed
    assert proposal.alpha_noise == pytest.approx(0.75, abs=0.03)  # (1 − α)·40 = 10
    assert proposal.noise_after == pytest.approx(10.0, rel=0.05)
