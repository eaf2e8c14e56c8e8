"""Synthetic multimodal demo cohort with planted truth.

:func:`make_demo_cohort` writes a small but realistic multimodal cohort in the
file formats users really have (DICOM series, a NIfTI ROI, an AnnData
expression matrix, a GMT gene-set file, long-format EHR events and a clinical
table), together with ``ground_truth.json`` describing the latent biology that
generated it.  The demo experiment trains on it; tests check that radfusion
recovers what was planted.

Planted truth
-------------
Every patient has independent standard-normal latent factors ``tumour``,
``metabolic``, ``oedema``, ``immune``, ``inflammation`` (all prognostic),
``proliferation`` (a nuisance that is *not* prognostic), a standardised age
and ``frailty`` (prognostic, measured by no modality).  The linear predictor is

.. math:: \\eta = \\sum_f \\beta_f z_f, \\qquad
          \\beta = (1.0, 0.9, 0.7, 0.9, 0.9, 0.4, 1.0)

(:data:`COEFFICIENTS`; age enters as ``(age - 63) / 10``); adding the site's
baseline log-hazard (:data:`SITE_LOG_HAZARD`) gives the log-hazard, and survival
times follow a Weibull proportional-hazards model (Bender, Augustin & Blettner,
*Statistics in Medicine* 24:1713, 2005):

.. math:: T = \\lambda \\left(\\frac{-\\log U}{e^{\\eta + s}}\\right)^{1/k},
          \\qquad U \\sim \\mathcal{U}(0, 1)

with administrative censoring and random dropout.  Each factor is visible in
one modality only, so the modalities are complementary:

- CT: lesion radius ``clip(9 + 3 tumour, 4, 16)`` mm, texture heterogeneity
  and a necrotic core for large lesions (``tumour``);
- PET: lesion SUV ``3 + 4 sigmoid(1.5 metabolic)`` (``metabolic``; lesion size
  follows the CT lesion);
- MR: peritumoural oedema rim ``clip(3 + 1.5 oedema, 0, 6)`` mm (``oedema``);
- omics: activity of a few gene sets (``immune``; ``proliferation`` drives
  other sets as a nuisance);
- EHR: crp, albumin, ldh, wbc trend with ``inflammation``, and sicker patients
  have more visits (informative missingness);
- clinical: age and a stage derived from ``tumour`` plus noise.

Site confounding is planted as well: a CT reconstruction kernel (``scanner``
column, SHARP or SMOOTH) that tracks the outcome at the training sites and is reversed
at the held-out site,
per-site baseline hazards, per-site PET calibration, MR intensity scales and
expression batch effects.
"""
from __future__ import annotations

import json
import math
import struct
from concurrent.futures import ProcessPoolExecutor
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["make_demo_cohort"]

# --------------------------------------------------------------------------
# Outcome model (tunable module-level constants)
# --------------------------------------------------------------------------

#: Cox/Weibull log-hazard coefficients of the latent factors.  ``age`` multiplies
#: ``(age - AGE_MEAN) / AGE_SD``.
COEFFICIENTS: dict[str, float] = {
    "tumour": 1.0,
    "metabolic": 0.9,
    "oedema": 0.7,
    "immune": 0.9,
    "inflammation": 0.9,
    "age": 0.4,
    "frailty": 1.0,
}
#: Latent factors drawn per patient (``age`` is the standardised age).
FACTORS: tuple[str, ...] = (
    "tumour",
    "metabolic",
    "oedema",
    "immune",
    "inflammation",
    "proliferation",
    "age",
    "frailty",
)
AGE_MEAN = 63.0
AGE_SD = 10.0
AGE_RANGE = (30.0, 89.0)  # ages above 89 would be PHI under HIPAA
WEIBULL_SHAPE = 1.3
#: Weibull scale (days); gives a cohort median survival of about 700 days.
WEIBULL_SCALE_DAYS = 1000.0
ADMIN_CENSORING_DAYS = (600.0, 1800.0)
DROPOUT_PROBABILITY = 0.10
#: ``frailty`` is prognostic but *no modality measures it* (e.g. the referral pathway).
#: At training sites the sicker-by-frailty patients get the SHARP CT protocol,
#: P(SHARP) = sigmoid(SHORTCUT_STRENGTH * frailty); at the held-out site the relation is
#: reversed, P(SHARP) = sigmoid(-SHORTCUT_STRENGTH * frailty).  The protocol is visible in
#: the CT, so a model can learn it as a proxy of frailty: a shortcut that fails at the
#: held-out site and that removing scanner information costs nothing real.
SHORTCUT_STRENGTH = 3.0
#: Site baseline log-hazard (case mix / standard of care), cycled over sites.  Constant
#: within a site, so it does not change any within-site ranking, but it makes the site
#: worth recognising for a model pooled over sites.
SITE_LOG_HAZARD = (0.5, -0.5, 0.25, -0.25, 0.0)
#: PET cross-calibration factor of each site's scanner (measured SUV / true SUV), cycled
#: over sites: a site signature in every PET (the body background reads 0.8-1.25).
SITE_PET_CALIBRATION = (1.0, 0.8, 1.25, 0.9, 1.1)
CT_NOISE_SD_HU = {"SHARP": 45.0, "SMOOTH": 12.0}
#: Calibration offset of the SHARP-protocol scanner (HU added everywhere inside the body):
#: survives resampling to a coarse grid, so a CNN can read the protocol from mean intensity.
CT_HU_OFFSET = {"SHARP": 35.0, "SMOOTH": 0.0}
#: Probability that a modality is missing (independently; >= 1 image kept).
MISSING_RATES: dict[str, float] = {
    "ct": 0.04,
    "pet": 0.12,
    "mri": 0.12,
    "omics": 0.10,
    "ehr": 0.05,
}
EHR_WINDOW_DAYS = 180.0
EHR_MEAN_VISITS = 8.0
EHR_RATE_INFLAMMATION = 0.4
N_GENES = 2000
N_GENE_SETS = 40
MR_SITE_SCALE_RANGE = (400.0, 2500.0)
PET_HALF_LIFE_S = 6586.2
PET_DOSE_BQ_PER_KG = 3.7e6
PET_BLUR_SIGMA_MM = 3.0
PET_COUNTS_PER_SUV = 25.0  # Poisson-like noise level: counts per unit SUV

# --------------------------------------------------------------------------
# Image grids: (columns, rows, slices) and spacing (x, y, z) in mm
# --------------------------------------------------------------------------

_GRIDS: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "ct": ((80, 80, 20), (0.8, 0.8, 3.0)),
    "pet": ((40, 40, 16), (2.5, 2.5, 4.0)),
    "mri": ((64, 64, 16), (1.0, 1.0, 4.0)),
}
_MODALITY_TAG = {"ct": "CT", "pet": "PT", "mri": "MR"}
_SERIES_NUMBER = {"ct": 2, "pet": 3, "mri": 5}

# CT appearance (HU)
_HU_AIR = -1000.0
_HU_SOFT = 40.0
_HU_FAT = -100.0
_HU_LESION = 70.0
_HU_NECROSIS_DROP = 15.0

# MR (T2-weighted) relative intensities before the scanner scale
_MR_SOFT = 0.30
_MR_FAT = 0.75
_MR_LESION = 0.60
_MR_NECROSIS = 0.85
_MR_OEDEMA = 0.95
_MR_NOISE = 0.015

_LABS: dict[str, dict[str, Any]] = {
    # mean/sd on the log scale where log=True; loading on `inflammation`
    "crp": {"unit": "mg/L", "mean": math.log(5.0), "sd": 0.9, "log": True, "loading": 1.0,
            "p": 0.85, "decimals": 1, "min": 0.1},
    "albumin": {"unit": "g/dL", "mean": 3.9, "sd": 0.45, "log": False, "loading": -0.8,
                "p": 0.80, "decimals": 2, "min": 1.2},
    "hemoglobin": {"unit": "g/dL", "mean": 12.8, "sd": 1.5, "log": False, "loading": 0.0,
                   "p": 0.95, "decimals": 1, "min": 5.0},
    "wbc": {"unit": "10^9/L", "mean": 7.0, "sd": 1.8, "log": False, "loading": 0.7,
            "p": 0.95, "decimals": 2, "min": 0.5},
    "platelets": {"unit": "10^9/L", "mean": 250.0, "sd": 60.0, "log": False, "loading": 0.0,
                  "p": 0.90, "decimals": 0, "min": 10.0},
    "creatinine": {"unit": "mg/dL", "mean": 0.9, "sd": 0.22, "log": False, "loading": 0.0,
                   "p": 0.90, "decimals": 2, "min": 0.2},
    "ldh": {"unit": "U/L", "mean": 220.0, "sd": 60.0, "log": False, "loading": 0.8,
            "p": 0.60, "decimals": 0, "min": 50.0},
    "alp": {"unit": "U/L", "mean": 90.0, "sd": 30.0, "log": False, "loading": 0.0,
            "p": 0.55, "decimals": 0, "min": 20.0},
    "sodium": {"unit": "mmol/L", "mean": 139.0, "sd": 3.0, "log": False, "loading": 0.0,
               "p": 0.85, "decimals": 0, "min": 110.0},
    "bilirubin": {"unit": "mg/dL", "mean": math.log(0.6), "sd": 0.4, "log": True, "loading": 0.0,
                  "p": 0.40, "decimals": 2, "min": 0.05},
}

# --------------------------------------------------------------------------
# Fictional sites, equipment and people
# --------------------------------------------------------------------------

_INSTITUTIONS = [
    ("Northbridge General Hospital", "NORTHBRIDGE"),
    ("St. Aurelia Medical Centre", "PORT AURELIA"),
    ("Westfield University Hospital", "WESTFIELD"),
    ("Lakeside Cancer Institute", "LAKESIDE"),
    ("Riverside Regional Medical Center", "RIVERSIDE"),
    ("Hollowbrook Clinic", "HOLLOWBROOK"),
    ("Eastmoor Teaching Hospital", "EASTMOOR"),
    ("Greenvale Oncology Center", "GREENVALE"),
]
# manufacturer, SHARP model, SMOOTH model, SHARP kernel, SMOOTH kernel
_CT_VENDORS = [
    ("SIEMENS", "SOMATOM Force", "SOMATOM Definition AS", "Br64", "Br36"),
    ("GE MEDICAL SYSTEMS", "Revolution CT", "LightSpeed VCT", "BONEPLUS", "STANDARD"),
    ("Philips", "IQon Spectral CT", "Brilliance 64", "YC", "B"),
    ("TOSHIBA", "Aquilion ONE", "Aquilion PRIME", "FC52", "FC08"),
]
_PET_VENDORS = [
    ("SIEMENS", "Biograph mCT"),
    ("GE MEDICAL SYSTEMS", "Discovery MI"),
    ("Philips", "Vereos PET/CT"),
    ("SIEMENS", "Biograph Vision"),
]
_MR_VENDORS = [
    ("SIEMENS", "MAGNETOM Skyra", 3.0),
    ("GE MEDICAL SYSTEMS", "SIGNA Artist", 1.5),
    ("Philips", "Ingenia", 3.0),
    ("SIEMENS", "MAGNETOM Aera", 1.5),
]
_FIRST_F = (
    "MARY PATRICIA JENNIFER LINDA ELIZABETH BARBARA SUSAN JESSICA SARAH KAREN LISA NANCY "
    "BETTY MARGARET SANDRA ASHLEY KIMBERLY EMILY DONNA MICHELLE CAROL AMANDA DOROTHY MELISSA "
    "DEBORAH STEPHANIE REBECCA SHARON LAURA CYNTHIA AMY KATHLEEN ANGELA SHIRLEY ANNA BRENDA "
    "PAMELA EMMA NICOLE HELEN"
).split()
_FIRST_M = (
    "JAMES ROBERT JOHN MICHAEL DAVID WILLIAM RICHARD JOSEPH THOMAS CHARLES CHRISTOPHER DANIEL "
    "MATTHEW ANTHONY MARK DONALD STEVEN PAUL ANDREW JOSHUA KENNETH KEVIN BRIAN GEORGE TIMOTHY "
    "RONALD EDWARD JASON JEFFREY RYAN JACOB GARY NICHOLAS ERIC JONATHAN STEPHEN LARRY JUSTIN "
    "SCOTT BRANDON"
).split()
_LAST = (
    "SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ HERNANDEZ LOPEZ "
    "GONZALEZ WILSON ANDERSON THOMAS TAYLOR MOORE JACKSON MARTIN LEE PEREZ THOMPSON WHITE "
    "HARRIS SANCHEZ CLARK RAMIREZ LEWIS ROBINSON WALKER YOUNG ALLEN KING WRIGHT SCOTT TORRES "
    "NGUYEN HILL FLORES GREEN ADAMS NELSON BAKER HALL RIVERA CAMPBELL MITCHELL CARTER ROBERTS "
    "MUELLER SCHMIDT ROSSI DUBOIS KOWALSKI NOVAK JANSSEN LARSEN OKAFOR TANAKA"
).split()
_STREETS = (
    "MAPLE OAK CEDAR PINE ELM WASHINGTON LAKE HILL PARK MAIN CHURCH HIGH MILL RIVER SPRING "
    "SUNSET RIDGE WILLOW CHESTNUT WALNUT BIRCH MEADOW"
).split()
_STREET_SUFFIX = ["ST", "AVE", "RD", "LN", "DR", "CT", "WAY"]
_GENE_PREFIXES = (
    "ABC ADAM AKR ALDH ANK ARHG ATP BCL C1Q CCL CCR CD CDH CDK CEACAM CLEC COL CXCL CYP DUSP "
    "EPH FAM FBXO FGF GPR GST HOX IFI IL ITG KCN KIF KLF KRT LRRC MAP MMP MYO NFKB NOTCH OR "
    "PCDH PDE PIK PRKC PTP RAB RBM RPL RPS S100A SCN SEMA SERPIN SLC SMAD SOX SPRR STAT TLR "
    "TMEM TNF TNFRSF TRIM UBE USP WNT ZBTB ZNF"
).split()

_COHORT_STREAM = 0x5EEDC0  # entropy word that separates cohort-level draws
_UID_NAMESPACE = "radfusion-demo-v1"
_IMAGING = ("ct", "pet", "mri")


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _sigmoid(x: float | np.ndarray) -> float | np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _site_label(k: int) -> str:
    """``SITE-A`` .. ``SITE-Z``, ``SITE-AA`` .. (spreadsheet-style letters)."""
    letters = ""
    k += 1
    while k > 0:
        k, r = divmod(k - 1, 26)
        letters = chr(65 + r) + letters
    return f"SITE-{letters}"


def _fmt_ds(value: float) -> str:
    """Format a number as a DICOM decimal string (at most 16 characters)."""
    from pydicom.valuerep import format_number_as_ds

    return str(format_number_as_ds(float(value)))


def _fmt_tm(seconds: int) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}{(seconds // 60) % 60:02d}{seconds % 60:02d}"


def _fmt_da(d: date) -> str:
    return d.strftime("%Y%m%d")


def _gene_names(n: int) -> list[str]:
    """Unique, real-looking uppercase gene symbols (independent of the seed)."""
    rng = np.random.default_rng(20240611)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        prefix = _GENE_PREFIXES[int(rng.integers(len(_GENE_PREFIXES)))]
        number = int(rng.integers(1, 60 if len(prefix) > 3 else 400))
        suffix = "" if rng.random() < 0.8 else "ABCDL"[int(rng.integers(5))]
        name = f"{prefix}{number}{suffix}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[_UID_NAMESPACE, str(seed), *map(str, parts)]))


def _grid_axes(
    modality: str, centre: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World coordinates (mm, LPS) of voxel centres along x, y, z of a grid.

    Returns arrays of shapes (1, 1, nx), (1, ny, 1), (nz, 1, 1) so that they
    broadcast to the (z, y, x) voxel array.  The origin is rounded to 1e-4 mm so
    that the DICOM and NIfTI headers carry exactly the rendered geometry.
    """
    (nx, ny, nz), (sx, sy, sz) = _GRIDS[modality]
    origin = [round(c - (n - 1) / 2.0 * s, 4) for c, n, s in zip(centre, (nx, ny, nz), (sx, sy, sz))]
    x = (origin[0] + sx * np.arange(nx)).reshape(1, 1, nx)
    y = (origin[1] + sy * np.arange(ny)).reshape(1, ny, 1)
    z = (origin[2] + sz * np.arange(nz)).reshape(nz, 1, 1)
    return x, y, z


def _soft_inside(d: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased indicator of ``d < 0`` for a signed distance ``d`` in mm.

    A linear ramp from 1 (``d <= -width``) to 0 (``d >= width``).
    """
    return np.clip(0.5 - d / (2.0 * width), 0.0, 1.0)


# --------------------------------------------------------------------------
# Rendering: one analytic phantom sampled on every modality's grid
# --------------------------------------------------------------------------


def _box(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: tuple[float, float, float],
    half: tuple[float, float, float],
) -> tuple[slice, slice, slice]:
    """(z, y, x) index slices of the voxels within ``centre +/- half`` (mm)."""
    return tuple(  # type: ignore[return-value]
        slice(int(np.searchsorted(v.ravel(), c - h)), int(np.searchsorted(v.ravel(), c + h, side="right")))
        for v, c, h in ((z, centre[2], half[2]), (y, centre[1], half[1]), (x, centre[0], half[0]))
    )


def _fields(
    anat: dict[str, Any], x: np.ndarray, y: np.ndarray, z: np.ndarray, width: float,
    *, oedema: bool = False,
) -> dict[str, np.ndarray]:
    """Tissue fractions of the phantom at world coordinates (x, y, z) in mm.

    Returns arrays of shape (nz, ny, nx): ``body``, ``fat``, ``lesion``,
    ``necrosis`` and (if ``oedema``) ``oedema`` fractions in [0, 1], ``inside``
    (bool, voxel centre inside the lesion ellipsoid: the ROI) and ``box`` (the
    index slices around the lesion where the lesion fields are non-zero).
    Ellipsoids are evaluated only inside their bounding boxes.
    """
    shape = (z.shape[0], y.shape[1], x.shape[2])
    cx, cy, _ = anat["body_centre"]
    a, b = anat["body_axes"]
    rb = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    d_body = (rb - 1.0) * math.sqrt(a * b)
    body2d = _soft_inside(d_body, width)
    body = np.broadcast_to(body2d, shape)
    # subcutaneous fat ring + fat patches, restricted to the body
    ring = np.clip(body2d - _soft_inside(d_body + anat["subcut_fat_mm"], width), 0.0, 1.0)
    fat = np.broadcast_to(ring, shape).copy()
    for (px, py, pz, rx, ry, rz) in anat["fat_patches"]:
        r_geo = (rx * ry * rz) ** (1.0 / 3.0)
        grow = 1.0 + width / r_geo  # the soft edge ends at rho = grow
        box = _box(x, y, z, (px, py, pz), (rx * grow + 1.0, ry * grow + 1.0, rz * grow + 1.0))
        zs, ys, xs = z[box[0]], y[:, box[1]], x[:, :, box[2]]
        rho_p = np.sqrt(((xs - px) / rx) ** 2 + ((ys - py) / ry) ** 2 + ((zs - pz) / rz) ** 2)
        sub = fat[box]
        np.maximum(sub, _soft_inside((rho_p - 1.0) * r_geo, width), out=sub)
    fat *= body
    # lesion, necrotic core and oedema rim, inside the lesion's bounding box
    lx, ly, lz = anat["lesion_centre"]
    rx, ry, rz = anat["lesion_radii"]
    r_mean = (rx * ry * rz) ** (1.0 / 3.0)
    grow = 1.0 + (width + (anat["oedema_rim_mm"] if oedema else 0.0)) / r_mean
    box = _box(x, y, z, (lx, ly, lz), (rx * grow + 1.0, ry * grow + 1.0, rz * grow + 1.0))
    zs, ys, xs = z[box[0]], y[:, box[1]], x[:, :, box[2]]
    rho = np.sqrt(((xs - lx) / rx) ** 2 + ((ys - ly) / ry) ** 2 + ((zs - lz) / rz) ** 2)
    d_les = (rho - 1.0) * r_mean
    out: dict[str, np.ndarray] = {"body": body, "fat": fat, "box": box}  # type: ignore[dict-item]
    lesion = np.zeros(shape)
    lesion[box] = _soft_inside(d_les, width)
    out["lesion"] = lesion
    inside = np.zeros(shape, dtype=bool)
    inside[box] = rho <= 1.0
    out["inside"] = inside
    necrosis = np.zeros(shape)
    if anat["necrotic_core_mm"] > 0:
        necrosis[box] = _soft_inside(rho * r_mean - anat["necrotic_core_mm"], width) * lesion[box]
    out["necrosis"] = necrosis
    if oedema:
        rim = np.zeros(shape)
        t = anat["oedema_rim_mm"]
        if t > 0:
            rim[box] = np.clip(_soft_inside(d_les - t, width) - lesion[box], 0.0, 1.0) * body[box]
        out["oedema"] = rim
    return out


def _render_ct(spec: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CT volume in HU (float, (z, y, x)) and the lesion mask (uint8) on the CT grid."""
    from scipy.ndimage import gaussian_filter

    anat = spec["anatomy"]
    x, y, z = _grid_axes("ct", anat["body_centre"])
    f = _fields(anat, x, y, z, width=0.6)
    (_, _, _), (sx, sy, sz) = _GRIDS["ct"]
    hu = _HU_AIR + f["body"] * (_HU_SOFT - _HU_AIR)
    hu = hu + f["fat"] * (_HU_FAT - _HU_SOFT)
    # heterogeneous lesion texture: smoothed noise inside the lesion's box
    box = f["box"]
    sub_shape = tuple(s.stop - s.start for s in box)
    texture = gaussian_filter(rng.standard_normal(sub_shape), sigma=(1.2 / sz, 1.2 / sy, 1.2 / sx))
    texture /= max(float(texture.std()), 1e-6)
    les = f["lesion"][box]
    lesion_hu = _HU_LESION + anat["ct_texture_hu"] * texture - _HU_NECROSIS_DROP * f["necrosis"][box]
    hu[box] = hu[box] * (1.0 - les) + les * lesion_hu
    kernel = spec["kernel"]
    if kernel == "SMOOTH":
        hu = gaussian_filter(hu, sigma=(0.3, 0.7, 0.7))
    hu = hu + CT_HU_OFFSET[kernel] * f["body"]
    hu = hu + CT_NOISE_SD_HU[kernel] * rng.standard_normal(hu.shape, dtype=np.float32)
    return hu, f["inside"].astype(np.uint8)


def _render_pet(spec: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """PET SUVbw volume ((z, y, x), noisy) and noiseless lesion statistics."""
    from scipy.ndimage import gaussian_filter

    anat = spec["anatomy"]
    x, y, z = _grid_axes("pet", anat["body_centre"])
    f = _fields(anat, x, y, z, width=1.2)
    (_, _, _), (sx, sy, sz) = _GRIDS["pet"]
    suv_planted = spec["pet"]["suv_planted"]
    suv = f["body"] * 1.0 * (1.0 - f["lesion"]) + f["lesion"] * suv_planted
    s = PET_BLUR_SIGMA_MM
    suv = gaussian_filter(suv, sigma=(s / sz, s / sy, s / sx), mode="constant")
    inside = f["inside"]
    stats = {
        "suv_planted": float(suv_planted),
        "suv_lesion_mean": float(suv[inside].mean()) if inside.any() else float("nan"),
        "suvmax": float(suv.max()),
        "lesion_voxels": int(inside.sum()),
    }
    noisy = rng.poisson(np.clip(suv, 0.0, None) * PET_COUNTS_PER_SUV) / PET_COUNTS_PER_SUV
    return noisy, stats


def _render_mri(spec: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """T2-weighted-like MR volume ((z, y, x)) in arbitrary scanner units."""
    anat = spec["anatomy"]
    x, y, z = _grid_axes("mri", anat["body_centre"])
    f = _fields(anat, x, y, z, width=0.8, oedema=True)
    rel = f["body"] * _MR_SOFT + f["fat"] * (_MR_FAT - _MR_SOFT)
    les = _MR_LESION + (_MR_NECROSIS - _MR_LESION) * f["necrosis"]
    rel = rel * (1.0 - f["lesion"]) + f["lesion"] * les
    rel = rel * (1.0 - f["oedema"]) + f["oedema"] * _MR_OEDEMA
    # Rician noise
    n1 = _MR_NOISE * rng.standard_normal(rel.shape, dtype=np.float32)
    n2 = _MR_NOISE * rng.standard_normal(rel.shape, dtype=np.float32)
    rel = np.sqrt((rel + n1) ** 2 + n2**2)
    # smooth multiplicative bias field (coefficients per mm from the body centre)
    cx, cy, cz = anat["body_centre"]
    gx, gy, gz, q = spec["mri"]["bias"]
    bias = np.exp(gx * (x - cx) + gy * (y - cy) + gz * (z - cz)
                  + q * ((x - cx) ** 2 + (y - cy) ** 2) / 1000.0)
    return rel * bias * spec["mri"]["scale"]


# --------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------


def _base_dataset(spec: dict[str, Any], modality: str) -> Any:
    """A Dataset with every tag common to the slices of one series (no file meta)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, MRImageStorage, PositronEmissionTomographyImageStorage

    sop_class = {"ct": CTImageStorage, "pet": PositronEmissionTomographyImageStorage,
                 "mri": MRImageStorage}[modality]
    phi = spec["phi"]
    (nx, ny, nz), (sx, sy, sz) = _GRIDS[modality]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.Modality = _MODALITY_TAG[modality]
    # patient (fake PHI, consistent across the patient's series)
    ds.PatientName = phi["name"]
    ds.PatientID = phi["mrn"]
    ds.PatientBirthDate = phi["birth_date"]
    ds.PatientSex = phi["sex"]
    ds.PatientAge = phi["age_string"]
    ds.PatientAddress = phi["address"]
    ds.PatientWeight = _fmt_ds(spec["pet"]["weight_kg"])
    ds.PatientSize = _fmt_ds(spec["pet"]["height_m"])
    # study / equipment
    ds.StudyInstanceUID = spec["uids"]["study"]
    ds.StudyID = "1"
    ds.AccessionNumber = phi["accession"]
    ds.ReferringPhysicianName = ""
    ds.StudyDate = spec["study_date"]
    ds.StudyTime = _fmt_tm(spec["times"]["study"])
    ds.StudyDescription = "ONCOLOGY STAGING"
    ds.InstitutionName = spec["institution"]
    eq = spec["equipment"][modality]
    ds.Manufacturer = eq["manufacturer"]
    ds.ManufacturerModelName = eq["model"]
    ds.StationName = eq["station"]
    ds.SoftwareVersions = "radfusion-demo"
    # series
    ds.SeriesInstanceUID = spec["uids"][modality]
    ds.SeriesNumber = _SERIES_NUMBER[modality]
    ds.SeriesDate = spec["study_date"]
    ds.SeriesTime = _fmt_tm(spec["times"][modality])
    ds.AcquisitionDate = spec["study_date"]
    ds.AcquisitionTime = _fmt_tm(spec["times"][modality])
    ds.ContentDate = spec["study_date"]
    ds.ContentTime = _fmt_tm(spec["times"][modality])
    ds.FrameOfReferenceUID = spec["uids"]["frame_of_reference"]
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    # image plane / pixel
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_fmt_ds(sy), _fmt_ds(sx)]  # row spacing, column spacing
    ds.SliceThickness = _fmt_ds(sz)
    ds.SpacingBetweenSlices = _fmt_ds(sz)
    ds.Rows = ny
    ds.Columns = nx
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    if modality == "ct":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDescription = f"CT CHEST {eq['kernel']}"
        ds.PixelRepresentation = 1
        ds.KVP = "120"
        ds.ConvolutionKernel = eq["kernel"]
        ds.XRayTubeCurrent = 200
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
    elif modality == "pet":
        pet = spec["pet"]
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SeriesDescription = "PET WB FDG AC"
        ds.PixelRepresentation = 0
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.Units = "BQML"
        ds.CountsSource = "EMISSION"
        ds.CorrectedImage = ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"]
        ds.DecayCorrection = "START"
        ds.ReconstructionMethod = "OSEM 3i21s"
        ds.AttenuationCorrectionMethod = "CTAC"
        ds.NumberOfSlices = nz
        ds.FrameReferenceTime = "0"
        ds.ActualFrameDuration = 180000
        ds.DecayFactor = "1"
        ds.RescaleIntercept = "0"
        item = Dataset()
        item.Radiopharmaceutical = "Fluorodeoxyglucose"
        item.RadiopharmaceuticalStartTime = _fmt_tm(pet["injection_time_s"])
        item.RadiopharmaceuticalStartDateTime = spec["study_date"] + _fmt_tm(pet["injection_time_s"])
        item.RadionuclideTotalDose = pet["dose_ds"]
        item.RadionuclideHalfLife = _fmt_ds(PET_HALF_LIFE_S)
        item.RadionuclidePositronFraction = "0.9673"
        code = Dataset()
        code.CodeValue = "C-111A1"
        code.CodingSchemeDesignator = "SRT"
        code.CodeMeaning = "^18^Fluorine"
        item.RadionuclideCodeSequence = [code]
        ds.RadiopharmaceuticalInformationSequence = [item]
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SeriesDescription = "T2 TSE AX"
        ds.ProtocolName = "T2 TSE AX"
        ds.PixelRepresentation = 0
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = ["SK", "SP", "OSP"]
        ds.ScanOptions = "PFP"
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "*tse2d1_16"
        ds.RepetitionTime = "4000"
        ds.EchoTime = "95"
        ds.EchoTrainLength = 16
        ds.NumberOfAverages = "2"
        ds.MagneticFieldStrength = _fmt_ds(eq["field_t"])
        ds.ImagingFrequency = _fmt_ds(42.577478 * eq["field_t"])
        ds.ImagedNucleus = "1H"
    return ds


def _instance_numbers(mode: str, nz: int, rng: np.random.Generator) -> np.ndarray:
    """InstanceNumber of each z-ordered slice (ascending, descending or shuffled)."""
    if mode == "ascending":
        return np.arange(1, nz + 1)
    if mode == "descending":
        return np.arange(nz, 0, -1)
    return rng.permutation(nz) + 1


_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _encode(tag: int, vr: str, value: bytes | str) -> bytes:
    """Encode one data element in Explicit VR Little Endian (PS3.5 section 7.1.2)."""
    raw = value.encode("ascii") if isinstance(value, str) else value
    if len(raw) % 2:
        raw += b"\x00" if vr in ("UI", "OB") else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, len(raw)) + raw
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), len(raw)) + raw


def _file_meta(sop_class: str, sop_instance: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 section 7.1)."""
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    body = b"".join([
        _encode(0x00020001, "OB", b"\x00\x01"),
        _encode(0x00020002, "UI", sop_class),
        _encode(0x00020003, "UI", sop_instance),
        _encode(0x00020010, "UI", str(ExplicitVRLittleEndian)),
        _encode(0x00020012, "UI", str(PYDICOM_IMPLEMENTATION_UID)),
        _encode(0x00020013, "SH", "RADFUSION_DEMO"),
    ])
    return _PREAMBLE + _encode(0x00020000, "UL", struct.pack("<I", len(body))) + body


def _write_series(
    spec: dict[str, Any],
    modality: str,
    slices: np.ndarray,
    folder: Path,
    rng: np.random.Generator,
    slopes: list[str] | None = None,
) -> None:
    """Write one DICOM file per slice; file names are the SOPInstanceUIDs.

    The tags shared by all slices are built with pydicom and encoded once; the
    per-slice elements (SOPInstanceUID, InstanceNumber, ImagePositionPatient,
    SliceLocation, RescaleSlope, ImageIndex, PixelData) are encoded directly and
    merged in ascending tag order, which is ~20x faster than ``dcmwrite`` per
    slice and produces the same bytes.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    folder.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(spec, modality)
    sop_class = str(ds.SOPClassUID)
    varying = {
        0x00080018: "UI",  # SOPInstanceUID
        0x00200013: "IS",  # InstanceNumber
        0x00200032: "DS",  # ImagePositionPatient
        0x00201041: "DS",  # SliceLocation
        0x7FE00010: "OW",  # PixelData
    }
    if modality == "pet":
        varying[0x00281053] = "DS"  # RescaleSlope
        varying[0x00541330] = "US"  # ImageIndex
    constant: list[tuple[int, bytes]] = []
    for elem in ds:
        if int(elem.tag) in varying:
            continue
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_data_element(fp, elem)
        constant.append((int(elem.tag), fp.getvalue()))
    x, y, z = _grid_axes(modality, spec["anatomy"]["body_centre"])
    nz = slices.shape[0]
    numbers = _instance_numbers(spec["instance_order"][modality], nz, rng)
    x0 = _fmt_ds(float(x.ravel()[0]))
    y0 = _fmt_ds(float(y.ravel()[0]))
    for k in range(nz):
        sop = _uid(spec["seed"], spec["patient_id"], modality, "slice", k)
        zk = _fmt_ds(float(z.ravel()[k]))
        values: dict[int, bytes | str] = {
            0x00080018: sop,
            0x00200013: str(int(numbers[k])),
            0x00200032: "\\".join([x0, y0, zk]),
            0x00201041: zk,
            0x7FE00010: np.ascontiguousarray(slices[k]).tobytes(),
        }
        if modality == "pet":
            values[0x00281053] = slopes[k]  # type: ignore[index]
            values[0x00541330] = struct.pack("<H", k + 1)
        items = constant + [(tag, _encode(tag, varying[tag], v)) for tag, v in values.items()]
        items.sort(key=lambda item: item[0])
        with open(folder / f"{sop}.dcm", "wb") as fh:
            fh.write(_file_meta(sop_class, sop))
            fh.write(b"".join(b for _, b in items))


def _write_patient(spec: dict[str, Any]) -> dict[str, Any]:
    """Render and write one patient's images; return small per-patient results."""
    import SimpleITK as sitk

    out = Path(spec["out"])
    pdir = out / "images" / spec["patient_id"]
    pdir.mkdir(parents=True, exist_ok=True)
    ct_ss, pet_ss, mri_ss = spec["image_seed"].spawn(3)
    result: dict[str, Any] = {"patient_id": spec["patient_id"]}

    # CT (the mask is always defined on the CT grid, even when CT is missing)
    rng = np.random.default_rng(ct_ss)
    hu, mask = _render_ct(spec, rng)
    result["mask_voxels"] = int(mask.sum())
    if spec["has"]["ct"]:
        stored = (np.clip(np.rint(hu), -1024, 3071) + 1024).astype("<i2")
        _write_series(spec, "ct", stored, pdir / "ct", rng)
    x, y, z = _grid_axes("ct", spec["anatomy"]["body_centre"])
    img = sitk.GetImageFromArray(mask)
    img.SetSpacing(tuple(float(s) for s in _GRIDS["ct"][1]))
    img.SetOrigin((float(x.ravel()[0]), float(y.ravel()[0]), float(z.ravel()[0])))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(pdir / "roi.nii.gz"), True)

    if spec["has"]["pet"]:
        rng = np.random.default_rng(pet_ss)
        suv, stats = _render_pet(spec, rng)
        result["pet"] = stats
        activity = suv * spec["pet"]["bqml_per_suv"] * spec["pet"]["calibration"]
        slopes: list[str] = []
        stored_slices = np.empty(activity.shape, dtype="<u2")
        for k in range(activity.shape[0]):
            peak = float(activity[k].max())
            slope_s = _fmt_ds(peak / 65000.0 if peak > 0 else 1.0)
            slopes.append(slope_s)
            stored_slices[k] = np.clip(np.rint(activity[k] / float(slope_s)), 0, 65535)
        _write_series(spec, "pet", stored_slices, pdir / "pet", rng, slopes=slopes)

    if spec["has"]["mri"]:
        rng = np.random.default_rng(mri_ss)
        mr = _render_mri(spec, rng)
        stored = np.clip(np.rint(mr), 0, 65535).astype("<u2")
        _write_series(spec, "mri", stored, pdir / "mri", rng)
    return result


# --------------------------------------------------------------------------
# Cohort planning (all scalar draws, in the main process)
# --------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _site_params(n_sites: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    sites = []
    for k in range(n_sites):
        inst, city = _INSTITUTIONS[k % len(_INSTITUTIONS)]
        if k >= len(_INSTITUTIONS):
            inst = f"{inst} {k // len(_INSTITUTIONS) + 1}"
        sites.append({
            "site": _site_label(k),
            "institution": inst,
            "city": city,
            "ct_vendor": _CT_VENDORS[k % len(_CT_VENDORS)],
            "pet_vendor": _PET_VENDORS[k % len(_PET_VENDORS)],
            "mr_vendor": _MR_VENDORS[k % len(_MR_VENDORS)],
            "mri_scale": float(rng.uniform(*MR_SITE_SCALE_RANGE)),
            "log_hazard": SITE_LOG_HAZARD[k % len(SITE_LOG_HAZARD)],
            "pet_calibration": SITE_PET_CALIBRATION[k % len(SITE_PET_CALIBRATION)],
            "library_factor": float(rng.lognormal(0.0, 0.3)),
        })
    return sites


def _gene_model(rng: np.random.Generator, n_sites: int) -> dict[str, Any]:
    """Genes, gene sets and their loadings on the omics factors, batch shifts."""
    genes = _gene_names(N_GENES)
    base = rng.normal(4.5, 1.6, N_GENES)
    dispersion = rng.lognormal(math.log(0.15), 0.4, N_GENES)
    site_shift = rng.normal(0.0, 0.3, (n_sites, N_GENES))
    order = rng.permutation(N_GENES)
    pools = {"up": order[:150], "down": order[150:210], "nuisance": order[210:330]}
    background = order[330:]
    loadings = np.zeros((N_GENES, 2))  # columns: immune, proliferation
    loadings[pools["up"], 0] = rng.uniform(0.5, 0.8, len(pools["up"]))
    loadings[pools["down"], 0] = -rng.uniform(0.5, 0.8, len(pools["down"]))
    loadings[pools["nuisance"], 1] = rng.uniform(0.5, 0.8, len(pools["nuisance"]))
    kinds = ["up"] * 6 + ["down"] * 2 + ["nuisance"] * 4 + ["noise"] * (N_GENE_SETS - 12)
    kinds = [kinds[i] for i in rng.permutation(N_GENE_SETS)]
    sets: list[tuple[str, str, list[str]]] = []
    informative: dict[str, list[str]] = {"up": [], "down": [], "nuisance": []}
    for i, kind in enumerate(kinds):
        name = f"DEMO_PATHWAY_{i + 1:02d}"
        if kind == "noise":
            size = int(rng.integers(15, 81))
            members = rng.choice(background, size=size, replace=False)
        else:
            pool = pools[kind]
            size = int(rng.integers(15, min(60, len(pool)) + 1))
            members = rng.choice(pool, size=size, replace=False)
            informative[kind].append(name)
        sets.append((name, "synthetic gene set (radfusion demo cohort)",
                     [genes[j] for j in np.sort(members)]))
    return {"genes": genes, "base": base, "dispersion": dispersion, "site_shift": site_shift,
            "loadings": loadings, "sets": sets, "informative": informative}


def _unique_names(sexes: list[str], rng: np.random.Generator) -> list[str]:
    """DICOM PN ``LAST^FIRST[^M]``; unique per patient and consistent with sex."""
    perms = {
        "F": rng.permutation(len(_FIRST_F) * len(_LAST)),
        "M": rng.permutation(len(_FIRST_M) * len(_LAST)),
    }
    used = {"F": 0, "M": 0}
    names = []
    for sex in sexes:
        firsts = _FIRST_F if sex == "F" else _FIRST_M
        i = used[sex]
        used[sex] += 1
        combo = int(perms[sex][i % len(perms[sex])])
        first, last = firsts[combo // len(_LAST)], _LAST[combo % len(_LAST)]
        name = f"{last}^{first}"
        cycle = i // len(perms[sex])
        if cycle:
            name += "^" + "ABCDEFGHJKLMNPRSTW"[(cycle - 1) % 18]
            if cycle > 18:
                name += str(cycle)
        names.append(name)
    return names


def _plan_patient(
    i: int,
    ss: np.random.SeedSequence,
    site: dict[str, Any],
    held_out: bool,
    seed: int,
    sd_eta: float,
) -> dict[str, Any]:
    """Draw every scalar of one patient from that patient's own stream."""
    latent_ss, image_ss, omics_ss, ehr_ss = ss.spawn(4)
    rng = np.random.default_rng(latent_ss)
    z = rng.standard_normal(len(FACTORS))
    factors = {f: float(v) for f, v in zip(FACTORS, z)}
    age = float(np.clip(AGE_MEAN + AGE_SD * factors["age"], *AGE_RANGE))
    factors["age"] = (age - AGE_MEAN) / AGE_SD
    sex = "F" if rng.random() < 0.5 else "M"
    stage_score = factors["tumour"] + 0.6 * rng.standard_normal()
    stage = ["I", "II", "III", "IV"][int(np.searchsorted([-0.98, 0.0, 0.98], stage_score))]
    # missing modalities (resample imaging until at least one image is present)
    u = rng.random(5)
    while all(u[j] < MISSING_RATES[m] for j, m in enumerate(_IMAGING)):
        u[:3] = rng.random(3)
    has = {m: bool(u[j] >= MISSING_RATES[m]) for j, m in enumerate(_IMAGING + ("omics", "ehr"))}
    has["clinical"] = True
    # outcome
    eta = sum(COEFFICIENTS[f] * factors[f] for f in COEFFICIENTS)
    log_hazard = eta + site["log_hazard"]
    t_event = WEIBULL_SCALE_DAYS * (-math.log(1.0 - rng.random()) / math.exp(log_hazard)) ** (1.0 / WEIBULL_SHAPE)
    c_admin = rng.uniform(*ADMIN_CENSORING_DAYS)
    dropout = rng.random() < DROPOUT_PROBABILITY
    c_drop = rng.uniform(0.3 * c_admin, c_admin)
    censor = c_drop if dropout else c_admin
    time = max(round(min(t_event, censor), 1), 0.1)
    event = int(t_event <= censor)
    # site shortcut (CT reconstruction kernel)
    p_sharp = float(_sigmoid((-1.0 if held_out else 1.0) * SHORTCUT_STRENGTH * factors["frailty"]))
    kernel = "SHARP" if rng.random() < p_sharp else "SMOOTH"
    # anatomy (world mm, LPS)
    body_centre = (round(rng.uniform(-5, 5), 2), round(rng.uniform(-30, -10), 2),
                   round(rng.uniform(-400, -100), 2))
    body_axes = (rng.uniform(33, 38), rng.uniform(28, 31))
    radius = float(np.clip(9.0 + 3.0 * factors["tumour"], 4.0, 16.0))
    shape = rng.uniform(0.88, 1.12, 3)
    shape /= np.prod(shape) ** (1.0 / 3.0)
    offset = rng.uniform(-8.0, 8.0, 3)
    lesion_centre = tuple(float(c + o) for c, o in zip(body_centre, offset))
    fat_patches = []
    for _ in range(int(rng.integers(2, 5))):
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.8)
        fat_patches.append((
            body_centre[0] + rad * body_axes[0] * math.cos(ang),
            body_centre[1] + rad * body_axes[1] * math.sin(ang),
            body_centre[2] + rng.uniform(-25, 25),
            rng.uniform(3, 7), rng.uniform(3, 7), rng.uniform(5, 12),
        ))
    anatomy = {
        "body_centre": body_centre,
        "body_axes": body_axes,
        "subcut_fat_mm": float(rng.uniform(1.5, 4.0)),
        "fat_patches": fat_patches,
        "lesion_centre": lesion_centre,
        "lesion_radii": tuple(float(radius * s) for s in shape),
        "lesion_radius_mm": radius,
        "necrotic_core_mm": 0.4 * radius if radius >= 11.0 else 0.0,
        "ct_texture_hu": 4.0 + 12.0 * float(_sigmoid(1.5 * factors["tumour"])),
        "oedema_rim_mm": float(np.clip(3.0 + 1.5 * factors["oedema"], 0.0, 6.0)),
    }
    # PET acquisition (SUVbw = activity * weight_g / decayed dose)
    weight = round(float(np.clip(rng.normal(76, 13), 50, 110)), 1)
    height = round(float(np.clip(rng.normal(1.70, 0.09), 1.45, 2.0)), 2)
    dose_ds = _fmt_ds(round(PET_DOSE_BQ_PER_KG * weight * rng.uniform(0.9, 1.1), -4))
    injection = int(rng.integers(8 * 3600, 14 * 3600))
    uptake = int(round(rng.uniform(50, 70) * 60))
    pet_start = injection + uptake
    decayed = float(dose_ds) * 2.0 ** (-uptake / PET_HALF_LIFE_S)
    pet = {
        "weight_kg": weight,
        "height_m": height,
        "dose_ds": dose_ds,
        "injection_time_s": injection,
        "uptake_s": uptake,
        "bqml_per_suv": decayed / (weight * 1000.0),
        "calibration": site["pet_calibration"],
        "suv_planted": 3.0 + 4.0 * float(_sigmoid(1.5 * factors["metabolic"])),
    }
    mri = {
        "scale": site["mri_scale"] * float(rng.uniform(0.9, 1.1)),
        "bias": tuple(float(v) for v in rng.uniform(-0.004, 0.004, 3)) + (float(rng.uniform(-0.1, 0.1)),),
    }
    study_date = date(2017, 1, 2) + timedelta(days=int(rng.integers(0, 4 * 365)))
    times = {"study": injection - 900, "ct": pet_start - 300, "pet": pet_start,
             "mri": pet_start + int(rng.integers(40, 120)) * 60}
    birth = study_date - timedelta(days=int(round(age * 365.25)))
    modes = ["ascending", "descending", "shuffled"]
    instance_order = {m: modes[int(rng.choice(3, p=[0.5, 0.25, 0.25]))] for m in _IMAGING}
    address_draw = (int(rng.integers(1, 9999)), _STREETS[int(rng.integers(len(_STREETS)))],
                    _STREET_SUFFIX[int(rng.integers(len(_STREET_SUFFIX)))],
                    int(rng.integers(10000, 99999)))
    return {
        "index": i, "seed": seed, "site": site["site"], "held_out": held_out,
        "factors": factors, "age": age, "sex": sex, "stage": stage, "has": has,
        "eta": float(eta), "log_hazard": float(log_hazard), "time": float(time), "event": event,
        "t_event": float(t_event), "censor_time": float(censor), "dropout": bool(dropout),
        "kernel": kernel, "scanner": f"{site['site']}-{kernel}", "p_sharp": p_sharp,
        "anatomy": anatomy, "pet": pet, "mri": mri,
        "study_date": _fmt_da(study_date), "birth_date": _fmt_da(birth), "times": times,
        "instance_order": instance_order, "address_draw": address_draw,
        "image_seed": image_ss, "omics_seed": omics_ss, "ehr_seed": ehr_ss,
    }


def _finish_specs(
    plans: list[dict[str, Any]], sites: dict[str, dict[str, Any]], seed: int, out: Path,
    cohort_rng: np.random.Generator,
) -> None:
    """Add identifiers, fake PHI, UIDs and equipment to each plan (in place)."""
    width = max(4, len(str(len(plans))))
    names = _unique_names([p["sex"] for p in plans], cohort_rng)
    mrns = cohort_rng.choice(9_000_000, size=len(plans), replace=False) + 1_000_000
    accessions = cohort_rng.choice(90_000_000, size=len(plans), replace=False) + 10_000_000
    addresses: set[str] = set()
    for p, name, mrn, acc in zip(plans, names, mrns, accessions):
        pid = f"DEMO-{p['index'] + 1:0{width}d}"
        p["patient_id"] = pid
        p["out"] = str(out)
        site = sites[p["site"]]
        house, street, suffix, postcode = p["address_draw"]
        address = f"{house} {street} {suffix}, {site['city']} {postcode}"
        while address in addresses:  # deterministic de-duplication
            house += 1
            address = f"{house} {street} {suffix}, {site['city']} {postcode}"
        addresses.add(address)
        p["phi"] = {
            "name": name,
            "mrn": f"MRN{int(mrn):07d}",
            "accession": f"A{int(acc):08d}",
            "birth_date": p["birth_date"],
            "sex": p["sex"],
            "age_string": f"{int(p['age']):03d}Y",
            "address": address[:64],
        }
        p["institution"] = site["institution"]
        manu, sharp_model, smooth_model, sharp_k, smooth_k = site["ct_vendor"]
        sharp = p["kernel"] == "SHARP"
        p["equipment"] = {
            "ct": {"manufacturer": manu, "model": sharp_model if sharp else smooth_model,
                   "kernel": sharp_k if sharp else smooth_k,
                   "station": f"{p['site']}-CT{1 if sharp else 2}"},
            "pet": {"manufacturer": site["pet_vendor"][0], "model": site["pet_vendor"][1],
                    "station": f"{p['site']}-PET1"},
            "mri": {"manufacturer": site["mr_vendor"][0], "model": site["mr_vendor"][1],
                    "field_t": site["mr_vendor"][2], "station": f"{p['site']}-MR1"},
        }
        p["uids"] = {
            "study": _uid(seed, pid, "study"),
            "frame_of_reference": _uid(seed, pid, "frame_of_reference"),
            **{m: _uid(seed, pid, m, "series") for m in _IMAGING},
        }


# --------------------------------------------------------------------------
# Tabular modalities
# --------------------------------------------------------------------------


def _expression(plans: list[dict[str, Any]], model: dict[str, Any], site_index: dict[str, int],
                sites: dict[str, dict[str, Any]]) -> Any:
    """Negative-binomial counts (gamma-Poisson) with batch effects, as AnnData."""
    import anndata as ad

    rows, ids, obs_sites = [], [], []
    for p in plans:
        if not p["has"]["omics"]:
            continue
        rng = np.random.default_rng(p["omics_seed"])
        f = np.array([p["factors"]["immune"], p["factors"]["proliferation"]])
        log_mu = (model["base"] + model["site_shift"][site_index[p["site"]]]
                  + model["loadings"] @ f + rng.normal(0.0, 0.25, N_GENES))
        library = rng.lognormal(0.0, 0.35) * sites[p["site"]]["library_factor"]
        mean = np.exp(log_mu) * library
        phi = model["dispersion"]
        lam = rng.gamma(shape=1.0 / phi, scale=mean * phi)
        rows.append(rng.poisson(lam).astype(np.float32))
        ids.append(p["patient_id"])
        obs_sites.append(p["site"])
    x = np.vstack(rows) if rows else np.zeros((0, N_GENES), dtype=np.float32)
    site_names = sorted(sites)
    obs = pd.DataFrame({"site": pd.Categorical(obs_sites, categories=site_names)},
                       index=pd.Index(ids, name="patient_id"))
    var = pd.DataFrame(index=pd.Index(model["genes"], name="gene_symbol"))
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.uns["radfusion_demo"] = {"count_model": "negative binomial (gamma-Poisson)",
                                   "layer": "X holds raw integer counts"}
    return adata


def _ehr(plans: list[dict[str, Any]]) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Irregular lab visits in [0, EHR_WINDOW_DAYS] (long format) and per-patient info."""
    labs = list(_LABS)
    p_measure = np.array([_LABS[v]["p"] for v in labs])
    norm = math.exp(EHR_RATE_INFLAMMATION**2 / 2.0 + 0.3**2 / 2.0)
    records: list[tuple[str, float, str, float]] = []
    info: dict[str, dict[str, Any]] = {}
    for p in plans:
        if not p["has"]["ehr"]:
            continue
        rng = np.random.default_rng(p["ehr_seed"])
        infl = p["factors"]["inflammation"]
        rate = rng.lognormal(0.0, 0.3) * math.exp(EHR_RATE_INFLAMMATION * infl) / norm
        n_visits = max(1, int(rng.poisson(EHR_MEAN_VISITS * rate)))
        times = np.sort(np.round(rng.uniform(0.0, EHR_WINDOW_DAYS, n_visits), 2))
        intercepts = rng.standard_normal(len(labs))
        for t in times:
            measured = rng.random(len(labs)) < p_measure
            if not measured.any():
                measured[int(np.argmax(p_measure))] = True
            noise = rng.standard_normal(len(labs))
            trend = 0.4 + 0.6 * t / EHR_WINDOW_DAYS
            for j, lab in enumerate(labs):
                if not measured[j]:
                    continue
                spec = _LABS[lab]
                zval = spec["loading"] * infl * trend + 0.5 * intercepts[j] + 0.3 * noise[j]
                value = spec["mean"] + spec["sd"] * zval
                if spec["log"]:
                    value = math.exp(value)
                value = round(max(value, spec["min"]), spec["decimals"])
                records.append((p["patient_id"], float(t), lab, float(value)))
        info[p["patient_id"]] = {"n_visits": n_visits, "visit_rate_per_180d": EHR_MEAN_VISITS * rate}
    df = pd.DataFrame.from_records(records, columns=["patient_id", "time", "variable", "value"])
    return df, info


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def make_demo_cohort(
    out: str | Path,
    *,
    n_patients: int = 400,
    n_sites: int = 4,
    seed: int = 0,
    n_workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write a synthetic multimodal cohort with planted truth into ``out``.

    Parameters
    ----------
    out
        Output folder; created, and must be empty or absent.
    n_patients
        Number of patients (>= 2 * ``n_sites``), spread evenly over the sites.
    n_sites
        Number of sites (>= 2); the last one is the held-out site where the
        CT-kernel shortcut carries no outcome information.
    seed
        Non-negative seed; the same seed gives identical tables, UIDs and pixel
        data, whatever ``n_workers`` is.
    n_workers
        Processes used to render and write the images.
    progress
        Show a tqdm progress bar.

    Returns
    -------
    Path
        ``out / "manifest.csv"``.  Next to it: ``images/<patient_id>/{ct,pet,mri}``
        (DICOM series) and ``roi.nii.gz`` (lesion mask on the CT grid),
        ``expression.h5ad``, ``gene_sets.gmt``, ``ehr.csv``, ``clinical.csv``
        and ``ground_truth.json``.

    Raises
    ------
    ValueError
        If ``out`` is a non-empty folder or a file, or an argument is invalid.
    """
    n_sites = _check_int("n_sites", n_sites, 2)
    n_patients = _check_int("n_patients", n_patients, 2 * n_sites)
    seed = _check_int("seed", seed, 0)
    n_workers = _check_int("n_workers", n_workers, 1)
    if not isinstance(progress, (bool, np.bool_)):
        raise ValueError(f"progress must be a bool, got {progress!r}")
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"out: {out} exists and is not a folder; expected an empty or absent folder")
        if any(out.iterdir()):
            raise ValueError(f"out: folder {out} is not empty; expected an empty or absent folder")
    out.mkdir(parents=True, exist_ok=True)

    # ---- plan the cohort (deterministic, independent of n_workers)
    cohort_rng = np.random.default_rng(np.random.SeedSequence([seed, _COHORT_STREAM]))
    site_list = _site_params(n_sites, cohort_rng)
    sites = {s["site"]: s for s in site_list}
    site_index = {s["site"]: k for k, s in enumerate(site_list)}
    held_out_site = site_list[-1]["site"]
    gene_model = _gene_model(cohort_rng, n_sites)
    assignment = cohort_rng.permutation(np.arange(n_patients) % n_sites)
    sd_eta = math.sqrt(sum(b * b for b in COEFFICIENTS.values()))
    patient_ss = np.random.SeedSequence(seed).spawn(n_patients)
    plans = [
        _plan_patient(i, patient_ss[i], site_list[int(assignment[i])],
                      int(assignment[i]) == n_sites - 1, seed, sd_eta)
        for i in range(n_patients)
    ]
    _finish_specs(plans, sites, seed, out, cohort_rng)

    # ---- images (parallel), results collected in patient order
    specs = [{k: p[k] for k in ("patient_id", "seed", "out", "anatomy", "kernel", "pet", "mri",
                                 "has", "phi", "uids", "study_date", "times", "institution",
                                 "equipment", "instance_order", "image_seed")} for p in plans]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_patients, desc="demo cohort images", unit="patient")
    results: list[dict[str, Any]] = []
    try:
        if n_workers == 1:
            for s in specs:
                results.append(_write_patient(s))
                if bar is not None:
                    bar.update(1)
        else:
            chunk = max(1, min(8, n_patients // (4 * n_workers)))
            with ProcessPoolExecutor(max_workers=n_workers) as pool:
                for r in pool.map(_write_patient, specs, chunksize=chunk):
                    results.append(r)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    by_id = {r["patient_id"]: r for r in results}

    # ---- tables
    manifest_rows = []
    for p in plans:
        pid = p["patient_id"]
        row: dict[str, Any] = {"patient_id": pid, "site": p["site"], "scanner": p["scanner"],
                               "time": p["time"], "event": p["event"]}
        for m in _IMAGING:
            row[m] = f"images/{pid}/{m}" if p["has"][m] else ""
        for m in _IMAGING:
            row[f"{m}_mask"] = f"images/{pid}/roi.nii.gz" if p["has"][m] else ""
        manifest_rows.append(row)
    manifest = pd.DataFrame(manifest_rows, columns=[
        "patient_id", "site", "scanner", "time", "event",
        "ct", "pet", "mri", "ct_mask", "pet_mask", "mri_mask"])
    manifest_path = out / "manifest.csv"
    manifest.to_csv(manifest_path, index=False)

    clinical = pd.DataFrame({
        "patient_id": [p["patient_id"] for p in plans],
        "age": [round(p["age"], 1) for p in plans],
        "sex": [p["sex"] for p in plans],
        "stage": [p["stage"] for p in plans],
    })
    clinical.to_csv(out / "clinical.csv", index=False)

    ehr, ehr_info = _ehr(plans)
    ehr.to_csv(out / "ehr.csv", index=False)

    adata = _expression(plans, gene_model, site_index, sites)
    adata.write_h5ad(out / "expression.h5ad")
    with open(out / "gene_sets.gmt", "w", encoding="utf-8", newline="\n") as fh:
        for name, desc, members in gene_model["sets"]:
            fh.write("\t".join([name, desc, *members]) + "\n")

    # ---- ground truth (no PHI)
    patients_gt: dict[str, Any] = {}
    for p in plans:
        pid = p["patient_id"]
        anat = p["anatomy"]
        entry: dict[str, Any] = {
            "factors": {k: round(v, 6) for k, v in p["factors"].items()},
            "linear_predictor": round(p["eta"], 6),
            "log_hazard": round(p["log_hazard"], 6),
            "site": p["site"],
            "scanner": p["scanner"],
            "p_sharp": round(p["p_sharp"], 6),
            "has": {m: p["has"][m] for m in ("ct", "pet", "mri", "omics", "ehr", "clinical")},
            "time": p["time"],
            "event": p["event"],
            "event_time_uncensored": round(p["t_event"], 3),
            "censoring_time": round(p["censor_time"], 3),
            "dropout": p["dropout"],
            "stage": p["stage"],
            "lesion": {
                "centre_mm": [round(c, 4) for c in anat["lesion_centre"]],
                "radii_mm": [round(r, 4) for r in anat["lesion_radii"]],
                "radius_mm": round(anat["lesion_radius_mm"], 4),
                "necrotic_core_mm": round(anat["necrotic_core_mm"], 4),
                "ct_texture_sd_hu": round(anat["ct_texture_hu"], 4),
                "oedema_rim_mm": round(anat["oedema_rim_mm"], 4),
                "mask_voxels_ct_grid": by_id[pid]["mask_voxels"],
            },
            "body_centre_mm": list(anat["body_centre"]),
            "mri_intensity_scale": round(p["mri"]["scale"], 4),
            "dicom_instance_order": p["instance_order"],
        }
        if "pet" in by_id[pid]:
            entry["pet"] = {k: (round(v, 6) if isinstance(v, float) else v)
                            for k, v in by_id[pid]["pet"].items()}
            entry["pet"]["site_calibration"] = p["pet"]["calibration"]  # measured SUV = calibration x true SUV
        if pid in ehr_info:
            entry["ehr"] = {k: (round(v, 6) if isinstance(v, float) else v)
                            for k, v in ehr_info[pid].items()}
        patients_gt[pid] = entry
    observed_missing = {m: round(float(np.mean([not p["has"][m] for p in plans])), 4)
                        for m in MISSING_RATES}
    truth = {
        "seed": seed,
        "n_patients": n_patients,
        "n_sites": n_sites,
        "sites": [s["site"] for s in site_list],
        "held_out_site": held_out_site,
        "time_unit": "days",
        "ehr_window_days": EHR_WINDOW_DAYS,
        "coefficients": dict(COEFFICIENTS),
        "age_standardisation": {"mean": AGE_MEAN, "sd": AGE_SD,
                                "note": "age enters the linear predictor as (age - mean) / sd"},
        "survival_model": {
            "type": "Weibull proportional hazards",
            "shape": WEIBULL_SHAPE,
            "scale_days": WEIBULL_SCALE_DAYS,
            "administrative_censoring_days": list(ADMIN_CENSORING_DAYS),
            "dropout_probability": DROPOUT_PROBABILITY,
            "observed_event_rate": round(float(np.mean([p["event"] for p in plans])), 4),
        },
        "modality_factors": {
            "ct": ["tumour"], "pet": ["metabolic"], "mri": ["oedema"], "omics": ["immune"],
            "ehr": ["inflammation"], "clinical": ["age", "stage(tumour)"],
        },
        "nuisance_factors": ["proliferation"],
        "image_mappings": {
            "ct": "lesion radius = clip(9 + 3*tumour, 4, 16) mm; texture sd = 4 + 12*sigmoid(1.5*tumour) HU; "
                  "necrotic core (-15 HU) when radius >= 11 mm",
            "pet": f"lesion SUVbw = 3 + 4*sigmoid(1.5*metabolic), background 1.0, Gaussian blur sigma "
                   f"{PET_BLUR_SIGMA_MM} mm; lesion size follows the CT lesion",
            "mri": "oedema rim = clip(3 + 1.5*oedema, 0, 6) mm; intensity scale per site and patient",
        },
        "informative_gene_sets": {
            "up": gene_model["informative"]["up"],
            "down": gene_model["informative"]["down"],
            "nuisance": gene_model["informative"]["nuisance"],
            "factor": "immune", "nuisance_factor": "proliferation",
        },
        "informative_labs": {
            lab: {"factor": "inflammation", "loading": spec["loading"],
                  "direction": "up" if spec["loading"] > 0 else "down", "unit": spec["unit"]}
            for lab, spec in _LABS.items() if spec["loading"] != 0
        },
        "lab_units": {lab: spec["unit"] for lab, spec in _LABS.items()},
        "ehr_visit_rate": f"Poisson visits, mean {EHR_MEAN_VISITS} * lognormal(0, 0.3) * "
                          f"exp({EHR_RATE_INFLAMMATION} * inflammation) (normalised)",
        "shortcut": {
            "description": f"CT protocol (manifest column 'scanner'): at training sites "
                           f"P(SHARP) = sigmoid({SHORTCUT_STRENGTH} * frailty); at the held-out site the relation "
                           f"is reversed, P(SHARP) = sigmoid(-{SHORTCUT_STRENGTH} * frailty). frailty is prognostic "
                           "(coefficient in 'coefficients') but no modality measures it. SHARP adds noise SD "
                           f"{CT_NOISE_SD_HU['SHARP']:g} HU and a +{CT_HU_OFFSET['SHARP']:g} HU calibration offset "
                           f"inside the body; SMOOTH {CT_NOISE_SD_HU['SMOOTH']:g} HU with a slight Gaussian blur. "
                           "A model that reads the protocol from the CT learns a proxy of frailty that fails at "
                           "the held-out site; removing scanner information costs no real signal.",
            "column": "scanner",
            "strength": SHORTCUT_STRENGTH,
            "held_out_strength": -SHORTCUT_STRENGTH,
            "noise_sd_hu": dict(CT_NOISE_SD_HU),
            "hu_offset": dict(CT_HU_OFFSET),
            "factor": "frailty",
        },
        "site_effects": {
            s["site"]: {"institution": s["institution"], "mri_intensity_scale": round(s["mri_scale"], 4),
                        "baseline_log_hazard": s["log_hazard"],
                        "pet_calibration": s["pet_calibration"],
                        "expression_library_factor": round(s["library_factor"], 6)}
            for s in site_list
        },
        "expression_batch": "per-site per-gene log-scale shift ~ N(0, 0.3) and per-site library factor",
        "missing_rates": dict(MISSING_RATES),
        "observed_missing_rates": observed_missing,
        "patients": patients_gt,
    }
    with open(out / "ground_truth.json", "w", encoding="utf-8", newline="\n") as fh:
        json.dump(truth, fh, indent=1)
        fh.write("\n")
    return manifest_path
