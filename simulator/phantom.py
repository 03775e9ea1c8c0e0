"""Synthetic anatomy in millimetres: a head (skull, brain, CSF, arterial tree, aneurysms) and a chest
(body wall, ribs, spine, lungs, airways, vessels, nodules), rendered onto the voxel centres of a scanner grid.

Shapes are analytic (ellipsoids, capsules) and anti-aliased over one voxel, so sampling them at a given pixel
spacing behaves like averaging a fine physical grid over the voxel. Values are *material indices* painted
with per-material values (HU for CT at the condition's kVp, or TOF-MRA signal) chosen by ``simulate.py``.
"""

from __future__ import annotations

import logging

import numpy as np

from simulator.paint import (  # noqa: F401 - the materials and the grid are part of the phantom's interface
    BONE_MATERIALS,
    CONTRAST_MATERIALS,
    MATERIAL_INDEX,
    MATERIAL_NAMES,
    MATERIALS,
    Anatomy,
    Grid,
    antialias,
    ellipsoid_depth,
    mark_landmark,
    new_anatomy,
    paint_capsule,
    paint_ellipsoid,
    paint_layers,
    paint_polyline,
    paint_sphere,
)

log = logging.getLogger(__name__)


def _arteries(rng: np.random.Generator, scale: float) -> dict[str, tuple[np.ndarray, float, float]]:
    def j(pts: list[tuple[float, float, float]], amount: float = 1.5) -> np.ndarray:
        p = np.asarray(pts, np.float64) * scale
        p[1:-1] += rng.normal(0.0, amount, size=p[1:-1].shape)
        return p

    rs = rng.uniform(0.85, 1.15)  # vessel radius scale for this subject
    tree: dict[str, tuple[np.ndarray, float, float]] = {}
    for side, s in (("left", 1.0), ("right", -1.0)):
        ica_term = (s * 13, -2, 0)
        tree[f"ica_{side}"] = (
            j([(s * 20, 8, -80), (s * 22, 4, -48), (s * 24, -6, -32), (s * 17, -14, -20), (s * 15, -13, -8), ica_term]),
            2.3 * rs,
            1.9 * rs,
        )
        tree[f"ophthalmic_{side}"] = (j([(s * 15, -13, -9), (s * 19, -28, -7), (s * 24, -45, -6)]), 0.7 * rs, 0.5 * rs)
        tree[f"m1_{side}"] = (j([ica_term, (s * 25, -1, 1), (s * 38, 1, 3)]), 1.6 * rs, 1.4 * rs)
        tree[f"m2_sup_{side}"] = (j([(s * 38, 1, 3), (s * 48, -8, 18), (s * 55, -2, 40)]), 1.1 * rs, 0.8 * rs)
        tree[f"m2_inf_{side}"] = (j([(s * 38, 1, 3), (s * 50, 12, 2), (s * 56, 28, -4)]), 1.1 * rs, 0.8 * rs)
        tree[f"a1_{side}"] = (j([ica_term, (s * 7, -10, 2), (s * 2, -14, 3)]), 1.2 * rs, 1.0 * rs)
        tree[f"a2_{side}"] = (
            j([(s * 2, -14, 3), (s * 3, -24, 20), (s * 3, -16, 42), (s * 3, 15, 55)]),
            1.0 * rs,
            0.8 * rs,
        )
        tree[f"pcomm_{side}"] = (j([(s * 14, -4, -2), (s * 11, 5, -2), (s * 8, 11, -1)]), 0.6 * rs, 0.6 * rs)
        tree[f"p1_{side}"] = (j([(0, 12, -3), (s * 8, 11, -1)]), 1.1 * rs, 1.1 * rs)
        tree[f"p2_{side}"] = (
            j([(s * 8, 11, -1), (s * 22, 26, 2), (s * 28, 48, 10), (s * 24, 70, 18)]),
            1.1 * rs,
            0.8 * rs,
        )
        tree[f"sca_{side}"] = (j([(0, 13, -7), (s * 12, 18, -9), (s * 20, 28, -10)]), 0.6 * rs, 0.5 * rs)
        tree[f"vertebral_{side}"] = (
            j([(s * 14, 32, -80), (s * 10, 30, -60), (s * 3, 24, -42), (0, 22, -38)]),
            1.6 * rs,
            1.5 * rs,
        )
        tree[f"pica_{side}"] = (j([(s * 8, 29, -55), (s * 16, 38, -58), (s * 20, 50, -56)]), 0.6 * rs, 0.5 * rs)
    tree["basilar"] = (j([(0, 22, -38), (0, 18, -20), (0, 12, -3)], 1.0), 1.7 * rs, 1.6 * rs)
    tree["acomm"] = (np.asarray([(2.0, -14, 3), (-2.0, -14, 3)]) * scale, 0.7 * rs, 0.7 * rs)
    return tree


# Aneurysm sites: (name, artery, index of the point on the artery, kind of place)
ANEURYSM_SITES = (
    ("acomm", "acomm", 0, "bifurcation"),
    ("mca_bifurcation_left", "m1_left", -1, "bifurcation"),
    ("mca_bifurcation_right", "m1_right", -1, "bifurcation"),
    ("ica_terminus_left", "ica_left", -1, "bifurcation"),
    ("ica_terminus_right", "ica_right", -1, "bifurcation"),
    ("basilar_tip", "basilar", -1, "bifurcation"),
    ("pcomm_origin_left", "pcomm_left", 0, "bifurcation"),
    ("pcomm_origin_right", "pcomm_right", 0, "bifurcation"),
    ("ica_ophthalmic_left", "ica_left", 4, "sidewall-near-bone"),
    ("ica_ophthalmic_right", "ica_right", 4, "sidewall-near-bone"),
    ("ica_cavernous_left", "ica_left", 3, "sidewall-near-bone"),
    ("ica_cavernous_right", "ica_right", 3, "sidewall-near-bone"),
    ("pericallosal_left", "a2_left", 2, "sidewall"),
)


def head(
    grid: Grid,
    rng: np.random.Generator,
    values: dict[str, float],
    labels: bool = False,
    n_aneurysms: int | None = None,
    aneurysm_diameters: list[float] | None = None,
) -> Anatomy:
    """Render a head with its arterial tree, aneurysms and landmarks onto ``grid``.

    Long because the anatomy is one recipe read top to bottom: later materials overwrite earlier ones,
    so the painting order is the model.

    Parameters
    ----------
    grid
        Voxel centres; the circle of Willis sits at the patient origin.
    rng
        The subject's random generator (sizes, positions, radii vary with it).
    values
        Value per material name (HU or MR signal) for this scanner condition.
    labels
        Also keep a dominant-material label map (tests).
    n_aneurysms
        How many aneurysms (default: 1 to 3 drawn from ``rng``); ignored when diameters are given.
    aneurysm_diameters
        Fixed aneurysm diameters in mm.

    Returns
    -------
    Anatomy
        The value image, labels, lesions (``kind="aneurysm"``) and landmarks.
    """
    width = float(max(grid.spacing[1], grid.spacing[2]))
    anat = new_anatomy(grid, values, labels)
    scale = float(rng.uniform(0.92, 1.08))
    a, b, c = 72 * scale * rng.uniform(0.95, 1.05), 92 * scale * rng.uniform(0.95, 1.05), 88 * scale
    hc = (0.0, 6.0 * scale, 22.0 * scale)
    scalp, table, diploe = rng.uniform(4, 7), rng.uniform(1.5, 2.5), rng.uniform(2.5, 4.5)
    skull = table * 2 + diploe
    # neck and skull base below the brain
    paint_ellipsoid(anat, "soft", (0, 15, -90), (55, 60, 70), width)  # neck
    paint_layers(
        anat,
        hc,
        (a, b, c),
        [
            (0.0, "soft"),
            (scalp, "bone_cortical"),
            (scalp + table, "bone_diploe"),
            (scalp + table + diploe, "bone_cortical"),
            (scalp + skull, "csf"),
            (scalp + skull + 1.5, "brain_gm"),
            (scalp + skull + 5.0, "brain_wm"),
        ],
        width,
    )
    # skull base: clivus and petrous ridges, the bone the ICAs run through (hard places for detection)
    paint_ellipsoid(anat, "bone_cortical", (0, 22 * scale, -40 * scale), (9, 9, 22), width)
    for s in (1.0, -1.0):
        paint_ellipsoid(anat, "bone_cortical", (s * 28 * scale, 4 * scale, -32 * scale), (20, 9, 7), width)
        paint_ellipsoid(anat, "bone_cancellous", (s * 16 * scale, -16 * scale, -22 * scale), (6, 8, 4), width)
    # ventricles
    vs = rng.uniform(0.8, 1.3)
    for s in (1.0, -1.0):
        paint_ellipsoid(anat, "csf", (s * 9 * scale, 2 * scale, 24 * scale), (5 * vs, 24 * vs, 7 * vs), width)
    paint_ellipsoid(anat, "csf", (0, 6 * scale, 8 * scale), (1.8, 10, 7), width)
    paint_ellipsoid(anat, "csf", (0, 34 * scale, -22 * scale), (5, 3, 4), width)  # fourth ventricle

    tree = _arteries(rng, scale)
    for pts, r0, r1 in tree.values():
        paint_polyline(anat, "artery", pts, np.linspace(r0, r1, len(pts)), width)

    # aneurysms
    if aneurysm_diameters is None:
        n = int(rng.integers(1, 4)) if n_aneurysms is None else n_aneurysms
        diameters = [float(np.exp(rng.uniform(np.log(2.0), np.log(12.0)))) for _ in range(n)]
    else:
        diameters = [float(d) for d in aneurysm_diameters]
    sites = rng.choice(len(ANEURYSM_SITES), size=min(len(diameters), len(ANEURYSM_SITES)), replace=False)
    for d, si in zip(diameters, sites, strict=False):
        site, artery, k, place = ANEURYSM_SITES[int(si)]
        pts, r0, r1 = tree[artery]
        base = pts[k]
        tangent = pts[min(k + 1, len(pts) - 1)] - pts[max(k - 1, 0)]
        tangent /= np.linalg.norm(tangent) + 1e-9
        direction = rng.normal(size=3)
        direction -= (direction @ tangent) * tangent  # out of the vessel wall
        if place == "bifurcation":
            direction = 0.4 * direction / np.linalg.norm(direction) + tangent
        direction /= np.linalg.norm(direction)
        r_vessel = float(r1 if k == -1 else r0)
        centre = base + direction * (r_vessel + 0.35 * d)
        paint_capsule(anat, "aneurysm", base + direction * r_vessel * 0.5, centre, min(r_vessel, d / 3), d / 2, width)
        if d > 6 and rng.random() < 0.5:  # daughter bleb on large ones
            paint_sphere(anat, "aneurysm", centre + direction * d * 0.45, d * 0.18, width)
        anat.lesions.append(
            {
                "kind": "aneurysm",
                "center_mm": [round(float(v), 3) for v in centre],
                "diameter_mm": round(d, 3),
                "site": site,
                "place": place,
            }
        )

    # landmarks
    for side in ("left", "right"):
        s = 1.0 if side == "left" else -1.0
        mark_landmark(anat, f"ica_terminus_{side}", tree[f"ica_{side}"][0][-1])
        mark_landmark(anat, f"ica_siphon_genu_{side}", tree[f"ica_{side}"][0][3])
        mark_landmark(anat, f"ica_petrous_{side}", tree[f"ica_{side}"][0][2])
        mark_landmark(anat, f"mca_bifurcation_{side}", tree[f"m1_{side}"][0][-1])
        mark_landmark(anat, f"ophthalmic_origin_{side}", tree[f"ophthalmic_{side}"][0][0])
        mark_landmark(anat, f"pcomm_origin_{side}", tree[f"pcomm_{side}"][0][0])
        mark_landmark(anat, f"pcomm_pca_junction_{side}", tree[f"p1_{side}"][0][-1])
        mark_landmark(anat, f"a1_a2_junction_{side}", tree[f"a2_{side}"][0][0])
        mark_landmark(anat, f"sca_origin_{side}", tree[f"sca_{side}"][0][1])
        mark_landmark(anat, f"pica_origin_{side}", tree[f"pica_{side}"][0][0])
        mark_landmark(anat, f"frontal_horn_{side}", (s * 9 * scale, 2 * scale - 24 * vs, 24 * scale))
        mark_landmark(anat, f"occipital_horn_{side}", (s * 9 * scale, 2 * scale + 24 * vs, 24 * scale))
        mark_landmark(anat, f"skull_lateral_{side}", (s * (a - scalp), hc[1], hc[2]))
    mark_landmark(anat, "basilar_tip", tree["basilar"][0][-1])
    mark_landmark(anat, "vertebrobasilar_junction", tree["basilar"][0][0])
    mark_landmark(anat, "acomm_centre", tree["acomm"][0].mean(axis=0))
    mark_landmark(anat, "third_ventricle", (0, 6 * scale, 8 * scale))
    mark_landmark(anat, "fourth_ventricle", (0, 34 * scale, -22 * scale))
    mark_landmark(anat, "clivus", (0, 22 * scale, -40 * scale))
    mark_landmark(anat, "vertex", (hc[0], hc[1], hc[2] + c - scalp))
    mark_landmark(anat, "frontal_pole", (hc[0], hc[1] - b + scalp, hc[2]))
    mark_landmark(anat, "occipital_pole", (hc[0], hc[1] + b - scalp, hc[2]))
    log.debug("head: %d aneurysms, %d landmarks", len(anat.lesions), len(anat.landmarks))
    return anat


# --- chest ----------------------------------------------------------------------------------------------------


def _branches(rng: np.random.Generator, start, direction, length: float, radius: float, depth: int, out: list) -> None:  # noqa: ANN001
    """A random dichotomous tree (airways, pulmonary vessels): segments (p0, p1, r0, r1)."""
    end = np.asarray(start) + direction * length
    out.append((np.asarray(start), end, radius, radius * 0.85))
    if depth == 0:
        return
    for sign in (1.0, -1.0):
        perp = np.cross(direction, rng.normal(size=3))
        perp /= np.linalg.norm(perp) + 1e-9
        new = direction + sign * rng.uniform(0.4, 0.8) * perp
        new /= np.linalg.norm(new)
        _branches(rng, end, new, length * rng.uniform(0.7, 0.85), radius * 0.72, depth - 1, out)


def chest(
    grid: Grid,
    rng: np.random.Generator,
    values: dict[str, float],
    labels: bool = False,
    n_nodules: int | None = None,
    nodule_diameters: list[float] | None = None,
) -> Anatomy:
    """Render a chest (carina at the patient origin) with nodules and landmarks onto ``grid``.

    Long because the anatomy is one recipe read top to bottom: later materials overwrite earlier ones,
    so the painting order is the model.

    Parameters
    ----------
    grid
        Voxel centres.
    rng
        The subject's random generator.
    values
        Value per material name (HU or MR signal) for this scanner condition.
    labels
        Also keep a dominant-material label map (tests).
    n_nodules
        How many nodules (default 1 to 4); ignored when diameters are given.
    nodule_diameters
        Fixed nodule diameters in mm.

    Returns
    -------
    Anatomy
        The value image, labels, lesions (``kind="nodule"``) and landmarks.
    """
    width = float(max(grid.spacing[1], grid.spacing[2]))
    anat = new_anatomy(grid, values, labels)
    s = float(rng.uniform(0.9, 1.1))
    a, b, h = 160 * s * rng.uniform(0.95, 1.05), 110 * s * rng.uniform(0.95, 1.05), 400.0
    fat = rng.uniform(8, 20)
    wall = [(0.0, "fat"), (fat, "muscle"), (fat + 12, "fat"), (fat + 22, "soft")]
    # the trunk is an elliptic cylinder: paint one slice, copy it along z
    one = (slice(0, 1), slice(None), slice(None))
    depth = ellipsoid_depth(grid, (0, 0, 0), (a, b, np.inf), one)[0]
    body = new_anatomy(Grid(grid.x, grid.y, grid.z[:1], grid.spacing), values, labels)
    paint_layers(body, (0, 0, 0), (a, b, np.inf), wall, width)
    anat.image[:] = body.image[0]
    if anat.labels is not None and body.labels is not None:
        anat.labels[:] = body.labels[0]
    # ribs: an elliptical band every ~25 mm, tilted down anteriorly
    ring = np.clip(antialias(depth - (fat + 13), width) - antialias(depth - (fat + 20), width), 0, 1)
    rows = np.nonzero(ring.any(axis=1))[0]
    if rows.size:
        phase = ((grid.z[:, None, None] - 0.25 * grid.y[None, :, None]) % np.float32(25.0)) / np.float32(25.0)
        rib = np.clip(1.0 - np.abs(phase - 0.5) / np.float32(0.16), 0, 1)[:, rows.min() : rows.max() + 1]
        box = (slice(None), slice(int(rows.min()), int(rows.max()) + 1), slice(None))
        anat.paint("bone_cortical", np.clip(rib * ring[box[1]][None] * 2 - 0.5, 0, 1), box)
    lung_c, lung_s = [], (a * 0.36, b * 0.62, 120 * s)
    for side, sx in (("left", 1.0), ("right", -1.0)):
        c = (sx * a * 0.42, 5.0, -20.0 * s)
        lung_c.append((side, sx, c))
        paint_ellipsoid(anat, "lung", c, lung_s, width)
    # mediastinum: heart, aorta, spine, sternum
    paint_ellipsoid(anat, "blood", (a * 0.12, -b * 0.25, -75 * s), (55 * s, 45 * s, 50 * s), width)
    paint_polyline(
        anat, "blood", [(-15, -20, -70), (-10, -15, 25), (5, 10, 40), (18, 30, 20), (18, 35, -150)], [14] * 5, width
    )
    spine_y = b - fat - 45
    paint_ellipsoid(anat, "bone_cortical", (0, spine_y, 0), (18, 16, h), width)
    paint_ellipsoid(anat, "bone_cancellous", (0, spine_y, 0), (15, 13, h), width)
    paint_ellipsoid(anat, "bone_cortical", (0, -b + fat + 16, -40), (12, 5, 90), width)
    # airways: trachea, main bronchi, random lobar trees; vessels alongside
    carina = np.array([0.0, 8.0, 0.0])
    paint_polyline(anat, "soft", [(0, -5, 140), (0, 2, 70), carina], [10.5, 10.5, 10], width)
    paint_polyline(anat, "airway", [(0, -5, 140), (0, 2, 70), carina], [8.5, 8.5, 8], width)
    mark_landmark(anat, "carina", carina)
    mark_landmark(anat, "trachea_inlet", (0, -5, 120))
    airways: list = []
    vessels: list = []
    for side, sx, c in lung_c:
        hilum = np.array([sx * 28 * s, 10.0, -12.0 * s])
        paint_polyline(anat, "soft", [carina, hilum], [7.5, 6.5], width)
        paint_polyline(anat, "airway", [carina, hilum], [6, 5], width)
        mark_landmark(anat, f"main_bronchus_{side}", hilum)
        mark_landmark(anat, f"lung_apex_{side}", (c[0], c[1], c[2] + lung_s[2] * 0.95))
        mark_landmark(anat, f"lung_base_{side}", (c[0], c[1], c[2] - lung_s[2] * 0.95))
        mark_landmark(anat, f"lung_lateral_{side}", (c[0] + sx * lung_s[0] * 0.95, c[1], c[2]))
        for lobe, d in (
            ("upper", (sx * 0.5, -0.2, 1.0)),
            ("lower", (sx * 0.5, 0.3, -1.0)),
            ("middle", (sx, -0.6, -0.2)),
        ):
            d = np.asarray(d) / np.linalg.norm(d)
            mark_landmark(anat, f"{lobe}_lobe_bronchus_{side}", hilum + d * 12)
            _branches(rng, hilum, d, 30 * s, 4.0, 4, airways)
            _branches(rng, hilum + np.array([0, -6.0, 0]), d, 32 * s, 4.5, 4, vessels)
    for p0, p1, r0, r1 in airways:
        paint_capsule(anat, "soft", p0, p1, r0 * 1.3, r1 * 1.3, width)
        paint_capsule(anat, "airway", p0, p1, r0, r1, width)
    for p0, p1, r0, r1 in vessels:
        paint_capsule(anat, "blood", p0, p1, r0, r1, width)
    for name, xyz in (
        ("aortic_arch", (5, 10, 42)),
        ("pulmonary_trunk", (5, -15, -15)),
        ("heart_centre", (a * 0.12, -b * 0.25, -75 * s)),
        ("sternal_notch", (0, -b + fat + 16, 50)),
        ("xiphoid", (0, -b + fat + 16, -130)),
        ("vertebral_body", (0, spine_y, 0)),
        ("descending_aorta", (18, 35, -60)),
    ):
        mark_landmark(anat, name, xyz)

    # nodules: solid or part-solid, inside a lung (some juxtapleural)
    if nodule_diameters is None:
        n = int(rng.integers(1, 5)) if n_nodules is None else n_nodules
        diameters = [float(np.exp(rng.uniform(np.log(4.0), np.log(25.0)))) for _ in range(n)]
    else:
        diameters = [float(x) for x in nodule_diameters]
    for d in diameters:
        side, sx, c = lung_c[int(rng.integers(0, 2))]
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        reach = rng.uniform(0.2, 0.85)
        centre = np.asarray(c) + u * np.asarray(lung_s) * reach - u * d / 2 * reach
        part_solid = rng.random() < 0.35
        if part_solid:
            paint_sphere(anat, "nodule_ggo", centre, d / 2, width)
            paint_sphere(anat, "nodule_solid", centre + rng.normal(0, d * 0.05, 3), d * rng.uniform(0.15, 0.3), width)
        else:
            paint_sphere(anat, "nodule_solid", centre, d / 2, width)
            for _ in range(3):  # lobulation
                paint_sphere(anat, "nodule_solid", centre + rng.normal(0, d * 0.15, 3), d * 0.3, width)
        anat.lesions.append(
            {
                "kind": "nodule",
                "center_mm": [round(float(v), 3) for v in centre],
                "diameter_mm": round(d, 3),
                "type": "part-solid" if part_solid else "solid",
                "lung": side,
            }
        )
    return anat
