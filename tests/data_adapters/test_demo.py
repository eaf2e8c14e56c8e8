"""Tests of the synthetic demo cohort generator (data_adapters/demo.py)."""
from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from scipy.stats import pearsonr, rankdata, spearmanr

from data_adapters.demo import make_demo_cohort

IMAGING = ("ct", "pet", "mri")
MANIFEST_COLUMNS = ["patient_id", "site", "scanner", "time", "event",
                    "ct", "pet", "mri", "ct_mask", "pet_mask", "mri_mask"]


# --------------------------------------------------------------------------- helpers


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    """All slices of a DICOM folder, sorted by position along the slice normal."""
    slices = [pydicom.dcmread(f) for f in folder.iterdir()]
    normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3)))
    slices.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))
    return slices


def _seconds(tm: str) -> float:
    return int(tm[:2]) * 3600 + int(tm[2:4]) * 60 + float(tm[4:])


def _suvbw(slices: list[pydicom.Dataset]) -> np.ndarray:
    """SUVbw volume computed by hand from the PET tags (z, y, x)."""
    first = slices[0]
    rp = first.RadiopharmaceuticalInformationSequence[0]
    assert first.Units == "BQML"
    assert first.DecayCorrection == "START"
    elapsed = _seconds(first.SeriesTime) - _seconds(rp.RadiopharmaceuticalStartTime)
    decayed = float(rp.RadionuclideTotalDose) * 2.0 ** (-elapsed / float(rp.RadionuclideHalfLife))
    weight_g = float(first.PatientWeight) * 1000.0
    bqml = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices])
    return bqml * weight_g / decayed


def _world_grid(slices: list[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World x, y, z (mm) of the voxel centres of an axial series, broadcastable to (z, y, x)."""
    row_sp, col_sp = (float(v) for v in slices[0].PixelSpacing)
    x0, y0, _ = (float(v) for v in slices[0].ImagePositionPatient)
    x = x0 + col_sp * np.arange(int(slices[0].Columns))
    y = y0 + row_sp * np.arange(int(slices[0].Rows))
    z = np.array([float(d.ImagePositionPatient[2]) for d in slices])
    return x[None, None, :], y[None, :, None], z[:, None, None]


def _fingerprint(out: Path) -> dict[str, str]:
    """Hashes of every table and of the DICOM pixel data and UIDs."""
    fp: dict[str, str] = {}
    for name in ("manifest.csv", "clinical.csv", "ehr.csv", "gene_sets.gmt",
                 "ground_truth.json", "expression.h5ad"):
        fp[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    for f in sorted((out / "images").rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        h = hashlib.sha256(ds.PixelData)
        for key in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
            h.update(str(getattr(ds, key)).encode())
        fp[str(f.relative_to(out))] = h.hexdigest()
    for f in sorted((out / "images").rglob("roi.nii.gz")):
        fp[str(f.relative_to(out))] = hashlib.sha256(
            sitk.GetArrayFromImage(sitk.ReadImage(str(f))).tobytes()).hexdigest()
    return fp


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-patient, 3-site cohort shared by the structure/physics/truth tests."""
    out = tmp_path_factory.mktemp("demo") / "cohort"
    manifest = make_demo_cohort(out, n_patients=60, n_sites=3, seed=7, progress=False)
    assert manifest == out / "manifest.csv"
    return out


@pytest.fixture(scope="module")
def manifest(cohort: Path) -> pd.DataFrame:
    return pd.read_csv(cohort / "manifest.csv", dtype={c: str for c in MANIFEST_COLUMNS[5:]},
                       keep_default_na=False)


@pytest.fixture(scope="module")
def truth(cohort: Path) -> dict:
    return json.loads((cohort / "ground_truth.json").read_text())


# --------------------------------------------------------------------------- determinism


def test_same_seed_is_identical_and_independent_of_workers(tmp_path: Path) -> None:
    a = make_demo_cohort(tmp_path / "a", n_patients=12, n_sites=3, seed=3, progress=False)
    b = make_demo_cohort(tmp_path / "b", n_patients=12, n_sites=3, seed=3, n_workers=2,
                         progress=False)
    fa, fb = _fingerprint(a.parent), _fingerprint(b.parent)
    assert len(fa) > 12 * 20
    assert fa == fb


def test_different_seed_differs(tmp_path: Path) -> None:
    a = make_demo_cohort(tmp_path / "a", n_patients=8, n_sites=2, seed=0, progress=False)
    b = make_demo_cohort(tmp_path / "b", n_patients=8, n_sites=2, seed=1, progress=False)
    fa, fb = _fingerprint(a.parent), _fingerprint(b.parent)
    for name in ("manifest.csv", "ehr.csv", "expression.h5ad", "ground_truth.json"):
        assert fa[name] != fb[name]
    shared = set(fa) & set(fb)
    assert not any(fa[k] == fb[k] for k in shared if k.endswith(".dcm"))


# --------------------------------------------------------------------------- structure


def test_manifest_structure(cohort: Path, manifest: pd.DataFrame, truth: dict) -> None:
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 60
    assert manifest["patient_id"].is_unique
    assert manifest["patient_id"].str.fullmatch(r"DEMO-\d{4}").all()
    assert set(manifest["site"]) == {"SITE-A", "SITE-B", "SITE-C"}
    assert manifest["site"].value_counts().min() >= 19  # spread evenly
    assert (manifest["time"] > 0).all()
    assert set(manifest["event"].unique()) <= {0, 1}
    assert manifest["event"].dtype.kind == "i"
    kernel = manifest["scanner"].str.rsplit("-", n=1).str[-1]
    assert (manifest["scanner"] == manifest["site"] + "-" + kernel).all()
    assert set(manifest["scanner"].str.rsplit("-", n=1).str[-1]) <= {"SHARP", "SMOOTH"}
    for _, row in manifest.iterrows():
        has = truth["patients"][row.patient_id]["has"]
        assert any(has[m] for m in IMAGING)
        for m in IMAGING:
            if has[m]:
                assert row[m] == f"images/{row.patient_id}/{m}"
                assert not Path(row[m]).is_absolute()
                folder = cohort / row[m]
                assert folder.is_dir() and len(list(folder.glob("*.dcm"))) > 0
                assert row[f"{m}_mask"] == f"images/{row.patient_id}/roi.nii.gz"
                assert (cohort / row[f"{m}_mask"]).is_file()
            else:
                assert row[m] == "" and row[f"{m}_mask"] == ""
                assert not (cohort / "images" / row.patient_id / m).exists()
    # the planted missingness produced some missing cells
    assert (manifest[["pet", "mri"]] == "").to_numpy().any()


def test_other_files(cohort: Path, manifest: pd.DataFrame, truth: dict) -> None:
    import anndata as ad

    clinical = pd.read_csv(cohort / "clinical.csv")
    assert list(clinical.columns) == ["patient_id", "age", "sex", "stage"]
    assert list(clinical["patient_id"]) == list(manifest["patient_id"])
    assert set(clinical["sex"]) <= {"M", "F"} and set(clinical["stage"]) <= {"I", "II", "III", "IV"}
    adata = ad.read_h5ad(cohort / "expression.h5ad")
    assert adata.n_vars == 2000 and adata.var_names.is_unique
    assert all(re.fullmatch(r"[A-Z][A-Z0-9]+", g) for g in adata.var_names)
    with_omics = [p for p, v in truth["patients"].items() if v["has"]["omics"]]
    assert list(adata.obs_names) == with_omics
    assert "site" in adata.obs
    x = np.asarray(adata.X)
    assert (x >= 0).all() and np.array_equal(x, np.round(x))
    sets = [line.rstrip("\n").split("\t") for line in (cohort / "gene_sets.gmt").read_text().splitlines()]
    assert len(sets) == 40
    assert all(15 <= len(s) - 2 <= 80 and set(s[2:]) <= set(adata.var_names) for s in sets)
    # informative sets track the immune factor (rank-based single-sample score)
    logcpm = np.log1p(x / x.sum(1, keepdims=True) * 1e6)
    ranks = np.apply_along_axis(rankdata, 1, logcpm)
    index = {g: i for i, g in enumerate(adata.var_names)}
    immune = np.array([truth["patients"][p]["factors"]["immune"] for p in adata.obs_names])
    by_name = {s[0]: s[2:] for s in sets}
    for kind, sign in (("up", 1), ("down", -1)):
        for name in truth["informative_gene_sets"][kind]:
            score = ranks[:, [index[g] for g in by_name[name]]].mean(1)
            assert sign * pearsonr(score, immune)[0] >= 0.6, name
    for key in ("seed", "n_patients", "n_sites", "sites", "held_out_site", "time_unit",
                "ehr_window_days", "coefficients", "modality_factors", "informative_gene_sets",
                "informative_labs", "shortcut", "missing_rates", "patients"):
        assert key in truth
    assert truth["held_out_site"] == "SITE-C" and truth["time_unit"] == "days"


def test_dicom_files_need_sorting_by_position(cohort: Path, truth: dict) -> None:
    non_monotonic = 0
    for pid, info in truth["patients"].items():
        for m in IMAGING:
            if not info["has"][m]:
                continue
            files = sorted((cohort / "images" / pid / m).iterdir())
            ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
            assert all(f.stem == d.SOPInstanceUID for f, d in zip(files, ds))
            z = np.array([float(d.ImagePositionPatient[2]) for d in ds])
            numbers = np.array([int(d.InstanceNumber) for d in ds])[np.argsort(z)]
            if not (np.all(np.diff(numbers) > 0) or np.all(np.diff(numbers) < 0)):
                non_monotonic += 1
            assert len({d.FrameOfReferenceUID for d in ds}) == 1
    assert non_monotonic > 0


# --------------------------------------------------------------------------- DICOM physics


def _patient_with(truth: dict, *modalities: str, largest: bool = False) -> str:
    ids = [p for p, v in truth["patients"].items() if all(v["has"][m] for m in modalities)]
    if largest:
        ids.sort(key=lambda p: truth["patients"][p]["lesion"]["radius_mm"])
        return ids[-1]
    return ids[0]


def test_ct_geometry_hu_and_mask(cohort: Path, truth: dict) -> None:
    pid = _patient_with(truth, "ct")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(cohort / "images" / pid / "ct")))
    ct = reader.Execute()
    assert np.allclose(ct.GetSpacing(), (0.8, 0.8, 3.0))
    assert ct.GetSize() == (80, 80, 20)
    hu = sitk.GetArrayFromImage(ct).astype(float)
    corners = np.concatenate([hu[:, :4, :4].ravel(), hu[:, -4:, -4:].ravel()])
    assert abs(corners.mean() + 1000) < 20
    mask_img = sitk.ReadImage(str(cohort / "images" / pid / "roi.nii.gz"))
    assert mask_img.GetSize() == ct.GetSize()
    assert np.allclose(mask_img.GetSpacing(), ct.GetSpacing(), atol=1e-4)
    assert np.allclose(mask_img.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    assert np.allclose(mask_img.GetDirection(), ct.GetDirection(), atol=1e-6)
    mask = sitk.GetArrayFromImage(mask_img).astype(bool)
    assert mask.sum() > 50
    assert mask.sum() == truth["patients"][pid]["lesion"]["mask_voxels_ct_grid"]
    assert 40 < hu[mask].mean() < 100  # enhancing lesion, soft tissue is ~40 HU
    body = (hu > -300) & ~mask
    assert -60 < np.median(hu[body]) < 80


def test_pet_suvbw_from_tags(cohort: Path, truth: dict) -> None:
    pid = _patient_with(truth, "pet", largest=True)
    slices = _read_series(cohort / "images" / pid / "pet")
    assert slices[0].SOPClassUID == pydicom.uid.PositronEmissionTomographyImageStorage
    assert {"DECY", "ATTN"} <= set(slices[0].CorrectedImage)
    assert len({d.RescaleSlope for d in slices}) > 1  # per-slice slopes
    suv = _suvbw(slices)
    lesion = truth["patients"][pid]["lesion"]
    x, y, z = _world_grid(slices)
    (cx, cy, cz), (rx, ry, rz) = lesion["centre_mm"], lesion["radii_mm"]
    inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0
    cal = truth["patients"][pid]["pet"]["site_calibration"]  # the site scanner's cross-calibration factor
    assert cal == truth["site_effects"][truth["patients"][pid]["site"]]["pet_calibration"]
    suv = suv / cal
    expected = truth["patients"][pid]["pet"]["suv_lesion_mean"]
    assert inside.sum() == truth["patients"][pid]["pet"]["lesion_voxels"]
    assert abs(suv[inside].mean() / expected - 1.0) < 0.05
    # background of the body ~ SUV 1, air ~ 0
    far = ((x - cx) / (rx + 12)) ** 2 + ((y - cy) / (ry + 12)) ** 2 + ((z - cz) / (rz + 12)) ** 2 > 1
    cb = truth["patients"][pid]["body_centre_mm"]
    central = (np.abs(x - cb[0]) < 20) & (np.abs(y - cb[1]) < 15) & far
    assert 0.85 < suv[np.broadcast_to(central, suv.shape)].mean() < 1.15
    assert suv[:, :2, :2].mean() < 0.1


def test_pet_lesion_suv_follows_metabolic_factor(cohort: Path, truth: dict) -> None:
    info = [v for v in truth["patients"].values() if v["has"]["pet"]]
    planted = [v["pet"]["suv_planted"] for v in info]
    metabolic = [v["factors"]["metabolic"] for v in info]
    assert spearmanr(planted, metabolic)[0] > 0.99


def test_modalities_share_frame_and_phi(cohort: Path, manifest: pd.DataFrame, truth: dict) -> None:
    names, mrns = set(), set()
    manifest_text = (cohort / "manifest.csv").read_text()
    truth_text = (cohort / "ground_truth.json").read_text()
    sop_classes = {"ct": pydicom.uid.CTImageStorage, "mri": pydicom.uid.MRImageStorage,
                   "pet": pydicom.uid.PositronEmissionTomographyImageStorage}
    for pid, info in list(truth["patients"].items())[:20]:
        headers = []
        for m in IMAGING:
            if info["has"][m]:
                f = next((cohort / "images" / pid / m).glob("*.dcm"))
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
                assert ds.SOPClassUID == sop_classes[m]
                assert ds.Modality == {"ct": "CT", "pet": "PT", "mri": "MR"}[m]
                assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
                headers.append(ds)
        keys = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAddress",
                "FrameOfReferenceUID", "StudyInstanceUID", "InstitutionName")
        for key in keys:
            assert len({str(getattr(d, key)) for d in headers}) == 1, key
        ds = headers[0]
        name, mrn = str(ds.PatientName), str(ds.PatientID)
        assert re.fullmatch(r"[A-Z]+\^[A-Z]+(\^[A-Z0-9]+)?", name)
        assert re.fullmatch(r"MRN\d{7}", mrn)
        assert len(str(ds.PatientAddress)) > 10
        born = datetime.strptime(ds.PatientBirthDate, "%Y%m%d")
        studied = datetime.strptime(ds.StudyDate, "%Y%m%d")
        clinical_age = (studied - born).days / 365.25
        assert abs(clinical_age - (63 + 10 * info["factors"]["age"])) < 0.1
        names.add(name)
        mrns.add(mrn)
        for phi in (name, mrn, str(ds.PatientBirthDate), str(ds.PatientAddress)):
            assert phi not in manifest_text and phi not in truth_text
    assert len(names) == len(mrns) == 20


def test_mr_has_site_dependent_scale_and_no_rescale(cohort: Path, truth: dict) -> None:
    medians = {}
    for pid, info in truth["patients"].items():
        if info["has"]["mri"] and info["site"] not in medians:
            slices = _read_series(cohort / "images" / pid / "mri")
            assert "RescaleSlope" not in slices[0]
            vol = np.stack([d.pixel_array for d in slices]).astype(float)
            medians[info["site"]] = np.median(vol[vol > 0.15 * vol.max()]) / info["mri_intensity_scale"]
            assert slices[0].pixel_array.dtype == np.uint16
    assert len(medians) >= 2
    # divided by the planted scale, soft tissue intensities agree across sites
    values = np.array(list(medians.values()))
    assert values.max() / values.min() < 1.3


# --------------------------------------------------------------------------- planted truth


def test_mask_volume_tracks_tumour_factor(cohort: Path, truth: dict) -> None:
    voxels, tumour = [], []
    for pid, info in truth["patients"].items():
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "images" / pid / "roi.nii.gz")))
        voxels.append(int(mask.sum()))
        tumour.append(info["factors"]["tumour"])
    assert min(voxels) > 0
    assert spearmanr(voxels, tumour)[0] > 0.8


def test_linear_predictor_matches_coefficients(truth: dict) -> None:
    coef = truth["coefficients"]
    for info in truth["patients"].values():
        eta = sum(beta * info["factors"][f] for f, beta in coef.items())
        assert abs(eta - info["linear_predictor"]) < 1e-4


def test_ehr_visits_and_times(cohort: Path, truth: dict) -> None:
    ehr = pd.read_csv(cohort / "ehr.csv")
    assert list(ehr.columns) == ["patient_id", "time", "variable", "value"]
    assert ehr["time"].between(0, 180).all()
    assert set(ehr["variable"]) == {"crp", "albumin", "hemoglobin", "wbc", "platelets",
                                     "creatinine", "ldh", "alp", "sodium", "bilirubin"}
    resorted = ehr.sort_values(["patient_id", "time"], kind="stable")
    assert resorted.index.equals(ehr.index)
    with_ehr = {p for p, v in truth["patients"].items() if v["has"]["ehr"]}
    assert set(ehr["patient_id"]) == with_ehr
    visits = ehr.groupby("patient_id")["time"].nunique()
    inflammation = [truth["patients"][p]["factors"]["inflammation"] for p in visits.index]
    assert spearmanr(visits.to_numpy(), inflammation)[0] > 0
    crp = ehr[ehr["variable"] == "crp"].groupby("patient_id")["value"].mean()
    assert spearmanr(crp.to_numpy(), [truth["patients"][p]["factors"]["inflammation"]
                                      for p in crp.index])[0] > 0.4


# --------------------------------------------------------------------------- bad input


def test_non_empty_folder_raises(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(out))):
        make_demo_cohort(out, n_patients=8, n_sites=2, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_patients": 7, "n_sites": 4}, "n_patients"),
        ({"n_patients": 10, "n_sites": 1}, "n_sites"),
        ({"n_patients": 10, "n_sites": 2, "seed": -1}, "seed"),
        ({"n_patients": 10, "n_sites": 2, "n_workers": 0}, "n_workers"),
        ({"n_patients": 10.0, "n_sites": 2}, "n_patients"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make_demo_cohort(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()
