"""Tests for data_adapters.imaging: DICOM/NIfTI reading, masks, preprocessing, cache, privacy."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)

from data_adapters import imaging
from data_adapters.errors import InputError
from data_adapters.imaging import (
    ImagingParams,
    Volume,
    VolumeCache,
    preprocess,
    read_dicom_series,
    read_image,
    read_mask,
    suv_bw_factor,
)


@pytest.fixture(autouse=True)
def _salt(monkeypatch):
    monkeypatch.setenv("RADFUSION_SALT", "test-salt")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
SOP = {"CT": CTImageStorage, "PT": PositronEmissionTomographyImageStorage, "MR": MRImageStorage}

# PET test constants: 70 kg, 370 MBq F-18 injected at 10:00:00, series at 11:00:00.
WEIGHT_KG = 70.0
DOSE_BQ = 370e6
HALF_LIFE_S = 6586.2
UPTAKE_S = 3600.0


def expected_suv_factor(uptake_s: float = UPTAKE_S) -> float:
    """SUVbw factor computed by hand: weight_g / (dose * 2^(-t/T))."""
    return (WEIGHT_KG * 1000.0) / (DOSE_BQ * 2.0 ** (-uptake_s / HALF_LIFE_S))


def make_slice(
    *,
    modality: str,
    pixels: np.ndarray,
    position,
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    pixel_spacing=(0.6, 0.7),
    instance_number: int = 1,
    uids: dict[str, str],
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    patient_name: str = "ANON^SYNTH",
    patient_id: str = "SYNTH001",
    pet: bool = False,
    pet_overrides: dict | None = None,
) -> Dataset:
    """A single-frame DICOM image dataset (int16 pixels) with the tags the reader uses."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP[modality]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SOP[modality]
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19500101"
    ds.PatientAddress = "1 Privacy Lane"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["for"]
    ds.StudyDate = "20240102"
    ds.SeriesDate = "20240102"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    ds.SliceThickness = "2.0"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if slope is not None:
        ds.RescaleSlope = f"{slope:.10g}"
    if intercept is not None:
        ds.RescaleIntercept = f"{intercept:.10g}"
    ds.PixelData = np.ascontiguousarray(pixels.astype("<i2")).tobytes()
    if pet:
        ds.Units = "BQML"
        ds.DecayCorrection = "START"
        ds.PatientWeight = f"{WEIGHT_KG}"
        ds.SeriesTime = "110000"
        ds.AcquisitionTime = "110500"
        item = Dataset()
        item.RadionuclideTotalDose = f"{DOSE_BQ:.6g}"
        item.RadionuclideHalfLife = f"{HALF_LIFE_S}"
        item.RadiopharmaceuticalStartTime = "100000"
        ds.RadiopharmaceuticalInformationSequence = Sequence([item])
        for k, v in (pet_overrides or {}).items():
            if v is None:
                if k in ds:
                    delattr(ds, k)
                elif k in item:
                    delattr(item, k)
            elif k.startswith("Radio"):
                setattr(item, k, v)
            else:
                setattr(ds, k, v)
    return ds


def write_series(
    folder: Path,
    *,
    modality: str = "CT",
    n_slices: int = 6,
    rows: int = 8,
    cols: int = 10,
    z_spacing: float = 2.5,
    origin=(-10.0, 20.0, 30.0),
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    pixel_spacing=(0.6, 0.7),
    skip: tuple[int, ...] = (),
    seed: int = 0,
    uids: dict[str, str] | None = None,
    **kw,
) -> tuple[Path, np.ndarray, dict]:
    """Write a series in shuffled file order with shuffled InstanceNumbers.

    Returns the folder, the stored values in position order (Z, Y, X) (skipped
    slices excluded) and the uids.  Slice k holds ``100 * k + y * cols + x``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uids = uids or {"study": generate_uid(), "series": generate_uid(), "for": generate_uid()}
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    rng = random.Random(seed)
    order = list(range(n_slices))
    numbers = list(range(1, n_slices + 1))
    rng.shuffle(numbers)  # InstanceNumber unrelated to position
    stored = []
    files = []
    for k in order:
        pixels = (100 * k + np.arange(rows * cols).reshape(rows, cols)).astype(np.int16)
        if k in skip:
            continue
        stored.append(pixels)
        pos = np.asarray(origin, float) + k * z_spacing * normal
        ds = make_slice(modality=modality, pixels=pixels, position=pos, orientation=orientation,
                        pixel_spacing=pixel_spacing, instance_number=numbers[k], uids=uids, **kw)
        files.append(ds)
    rng.shuffle(files)
    for i, ds in enumerate(files):
        ds.save_as(folder / f"IMG{rng.randrange(10**6):06d}_{i}.dcm", enforce_file_format=True)
    return folder, np.stack(stored).astype(np.float64), uids


def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_same_geometry(vol: Volume, img: sitk.Image, atol: float = 1e-4) -> None:
    np.testing.assert_allclose(vol.spacing, img.GetSpacing(), atol=atol)
    np.testing.assert_allclose(vol.origin, img.GetOrigin(), atol=atol)
    np.testing.assert_allclose(vol.direction, img.GetDirection(), atol=atol)


def box_volume(shape=(20, 20, 20), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), **kw) -> Volume:
    return Volume(array=np.zeros(shape, np.float32), spacing=spacing, origin=origin,
                  direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), **kw)


def write_label(path: Path, arr: np.ndarray, spacing, origin, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def dicomdir_folder(rel: str) -> Path:
    from pydicom.data import get_testdata_files

    files = get_testdata_files(f"dicomdirtests/{rel}/*")
    if not files:
        pytest.skip(f"pydicom test data dicomdirtests/{rel} not available")
    return Path(files[0]).parent


# --------------------------------------------------------------------------- #
# real DICOM (pydicom test data) against SimpleITK
# --------------------------------------------------------------------------- #
def test_real_ct_series_matches_simpleitk(tmp_path):
    src = dicomdir_folder("98892001/CT5N")  # 5 axial CT slices, one series, 2.5 mm apart
    series = tmp_path / "ct5n"
    series.mkdir()
    for f in src.iterdir():
        shutil.copy(f, series / f.name)
    vol = read_dicom_series(series)
    ref = sitk_series(series)
    assert vol.array.dtype == np.float32 and vol.array.shape == (5, 16, 16)
    np.testing.assert_allclose(vol.array, sitk.GetArrayFromImage(ref).astype(np.float64), atol=1e-3)
    assert_same_geometry(vol, ref)
    assert vol.modality == "CT" and vol.units == "HU"
    assert set(vol.uid_hashes) == {"StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"}
    assert all(v.startswith("uid-") for v in vol.uid_hashes.values())


def test_real_series_with_outlier_slice_reports_gap():
    # 77654033/CT2 holds one series whose first slice sits 202.5 mm from the others (1.25 mm apart)
    with pytest.raises(InputError, match=r"gap of 202\.500 mm.*expected spacing 1\.250 mm") as exc:
        read_dicom_series(dicomdir_folder("77654033/CT2"), patient="P01")
    assert exc.value.field == "ImagePositionPatient" and exc.value.patient == "P01"


def test_real_folder_with_several_series_is_an_error():
    with pytest.raises(InputError, match="found 3 DICOM series") as exc:
        read_dicom_series(dicomdir_folder("98892003/MR2"))
    assert exc.value.field == "SeriesInstanceUID"


def test_enhanced_multiframe_ct_matches_simpleitk():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("eCT_Supplemental.dcm")  # from the pydicom-data package
    if path is None:
        pytest.skip("pydicom-data's eCT_Supplemental.dcm not available")
    vol = read_image(path, modality="ct")
    ref = sitk.ReadImage(str(path))
    assert vol.array.shape == (2, 512, 512) and vol.units == "HU"
    np.testing.assert_allclose(vol.spacing, ref.GetSpacing(), atol=1e-5)
    # GDCM keeps file frame order (+z) while we sort along row x col = -z: same voxels in space.
    on_ref = sitk.Resample(vol.to_sitk(), ref, sitk.Transform(), sitk.sitkNearestNeighbor, -9999.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(on_ref), sitk.GetArrayFromImage(ref), atol=1e-3)
    np.testing.assert_allclose(np.cross(vol.direction_matrix[:, 0], vol.direction_matrix[:, 1]),
                               vol.direction_matrix[:, 2])


def test_multiframe_without_functional_groups_is_an_error():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("emri_small.dcm")
    if path is None:
        pytest.skip("pydicom-data's emri_small.dcm not available")
    with pytest.raises(InputError) as exc:
        read_image(path)
    assert exc.value.field == "PerFrameFunctionalGroupsSequence"


# --------------------------------------------------------------------------- #
# synthetic DICOM
# --------------------------------------------------------------------------- #
def test_synthetic_ct_sorted_by_position_not_instance_number(tmp_path):
    folder, stored, uids = write_series(tmp_path / "ct", n_slices=6, z_spacing=2.5)
    vol = read_dicom_series(folder, modality="ct")
    np.testing.assert_allclose(vol.array, stored - 1024.0, atol=1e-3)
    assert vol.spacing == pytest.approx((0.7, 0.6, 2.5))  # x = column spacing, y = row spacing
    assert vol.origin == pytest.approx((-10.0, 20.0, 30.0))
    assert vol.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert vol.uid_hashes["SeriesInstanceUID"] == imaging.hash_uid(uids["series"])
    assert_same_geometry(vol, sitk_series(folder))


def test_synthetic_oblique_series_matches_simpleitk(tmp_path):
    c, s = math.cos(0.3), math.sin(0.3)
    orientation = (c, s, 0.0, 0.0, 0.0, -1.0)  # oblique coronal
    folder, stored, _ = write_series(tmp_path / "obl", orientation=orientation, n_slices=5, z_spacing=3.0,
                                     slope=2.0, intercept=-1000.0)
    vol = read_dicom_series(folder)
    ref = sitk_series(folder)
    np.testing.assert_allclose(vol.array, stored * 2.0 - 1000.0, atol=1e-3)
    np.testing.assert_allclose(vol.array, sitk.GetArrayFromImage(ref), atol=1e-3)
    assert_same_geometry(vol, ref)


def test_synthetic_pet_suvbw(tmp_path):
    folder, stored, _ = write_series(tmp_path / "pet", modality="PT", n_slices=4, intercept=0.0, pet=True)
    # per-slice slopes, as PET scanners write them: rewrite each slice with its own slope
    slopes = {}
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        k = int(round((float(ds.ImagePositionPatient[2]) - 30.0) / 2.5))
        slopes[k] = 0.5 + 0.25 * k
        ds.RescaleSlope = f"{slopes[k]}"
        ds.save_as(f, enforce_file_format=True)
    vol = read_dicom_series(folder, modality="pet")
    factor = expected_suv_factor()
    expected = np.stack([stored[k] * slopes[k] * factor for k in range(4)])
    assert vol.modality == "PT" and vol.units == "SUVbw"
    np.testing.assert_allclose(vol.array, expected, rtol=1e-5)
    ds = pydicom.dcmread(next(folder.iterdir()))
    assert suv_bw_factor(ds) == pytest.approx(factor, rel=1e-9)
    # a concentration of 1 SUV in Bq/ml: dose decayed to scan start / weight
    one_suv = DOSE_BQ * 2 ** (-UPTAKE_S / HALF_LIFE_S) / (WEIGHT_KG * 1000.0)
    assert one_suv * suv_bw_factor(ds) == pytest.approx(1.0)


def _pet_ds(**overrides) -> Dataset:
    uids = {"study": generate_uid(), "series": generate_uid(), "for": generate_uid()}
    return make_slice(modality="PT", pixels=np.zeros((2, 2), np.int16), position=(0, 0, 0), uids=uids,
                      pet=True, pet_overrides=overrides)


def test_suv_factor_variants():
    # DateTime across midnight: injected 23:30 on Jan 1, series 00:30 on Jan 2 -> 1 h uptake
    ds = _pet_ds(RadiopharmaceuticalStartDateTime="20240101233000", SeriesTime="003000")
    assert suv_bw_factor(ds) == pytest.approx(expected_suv_factor(3600.0))
    # SeriesTime absent -> AcquisitionTime (11:05)
    assert suv_bw_factor(_pet_ds(SeriesTime=None)) == pytest.approx(expected_suv_factor(3900.0))
    # ADMIN: already decay-corrected to injection -> no decay term
    assert suv_bw_factor(_pet_ds(DecayCorrection="ADMIN")) == pytest.approx(WEIGHT_KG * 1000.0 / DOSE_BQ)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"PatientWeight": None}, "PatientWeight"),
        ({"RadionuclideTotalDose": None}, "RadionuclideTotalDose"),
        ({"RadionuclideHalfLife": None}, "RadionuclideHalfLife"),
        ({"RadiopharmaceuticalStartTime": None}, "RadiopharmaceuticalStartTime"),
        ({"SeriesTime": None, "AcquisitionTime": None}, "SeriesTime"),
        ({"Units": "CNTS"}, "Units"),
        ({"DecayCorrection": "NONE"}, "DecayCorrection"),
        ({"RadiopharmaceuticalStartTime": "120000"}, "RadiopharmaceuticalStartTime"),  # after the scan
    ],
)
def test_suv_factor_errors_name_the_field(overrides, field):
    with pytest.raises(InputError) as exc:
        suv_bw_factor(_pet_ds(**overrides), file="x.dcm", patient="P7")
    assert exc.value.field == field and exc.value.patient == "P7" and exc.value.file == "x.dcm"
    assert "70" not in str(exc.value)  # the weight is not echoed


def test_pet_series_missing_tag_names_file_and_field(tmp_path):
    folder, _, _ = write_series(tmp_path / "pet", modality="PT", n_slices=3, intercept=0.0, pet=True,
                                pet_overrides={"PatientWeight": None})
    with pytest.raises(InputError) as exc:
        read_dicom_series(folder, patient="P3")
    assert exc.value.field == "PatientWeight" and str(folder) in str(exc.value)


def test_two_series_in_one_folder(tmp_path):
    folder, _, _ = write_series(tmp_path / "two", n_slices=3)
    write_series(folder, n_slices=2, seed=5)  # second series, same folder
    with pytest.raises(InputError, match="found 2 DICOM series") as exc:
        read_dicom_series(folder, patient="P1")
    assert exc.value.file == str(folder) and exc.value.patient == "P1"


def test_missing_slice_reports_gap(tmp_path):
    folder, _, _ = write_series(tmp_path / "gap", n_slices=7, z_spacing=2.0, skip=(3,))
    with pytest.raises(InputError, match=r"gap of 4\.000 mm.*expected spacing 2\.000 mm") as exc:
        read_dicom_series(folder)
    assert exc.value.field == "ImagePositionPatient"
    assert "34.000 and 38.000" in str(exc.value)  # positions along the normal around the gap


def test_duplicate_position_is_an_error(tmp_path):
    folder, _, _ = write_series(tmp_path / "dup", n_slices=3)
    f = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(f)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / "copy.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="duplicate slice positions"):
        read_dicom_series(folder)


def test_mixed_orientation_is_an_error(tmp_path):
    uids = {"study": generate_uid(), "series": generate_uid(), "for": generate_uid()}
    folder, _, _ = write_series(tmp_path / "ori", n_slices=3, uids=uids)
    write_series(folder, n_slices=1, uids=uids, orientation=(0, 1, 0, 0, 0, -1), seed=3)
    with pytest.raises(InputError, match="2 different orientations") as exc:
        read_dicom_series(folder)
    assert exc.value.field == "ImageOrientationPatient"


def test_corrupt_file_is_named(tmp_path):
    folder, _, _ = write_series(tmp_path / "corrupt", n_slices=3)
    victim = sorted(folder.iterdir())[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 60])  # truncated inside the pixel data
    with pytest.raises(InputError) as exc:
        read_dicom_series(folder, patient="P9")
    assert str(victim) in str(exc.value) and "P9" in str(exc.value)


def test_non_dicom_file_is_named_hidden_files_ignored(tmp_path):
    folder, stored, _ = write_series(tmp_path / "txt", n_slices=3)
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden: ignored
    assert read_dicom_series(folder).array.shape == stored.shape
    notes = folder / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(InputError, match="not a DICOM file") as exc:
        read_dicom_series(folder)
    assert exc.value.file == str(notes)


def test_ct_without_rescale_tags(tmp_path):
    folder, stored, _ = write_series(tmp_path / "norescale", n_slices=3, slope=None, intercept=None)
    with pytest.raises(InputError) as exc:
        read_dicom_series(folder)
    assert exc.value.field == "RescaleIntercept"
    vol = read_dicom_series(folder, require_hu=False)
    assert vol.units == "a.u."
    np.testing.assert_allclose(vol.array, stored)


def test_modality_mismatch_is_an_error(tmp_path):
    folder, _, _ = write_series(tmp_path / "mr", modality="MR", n_slices=3, slope=None, intercept=None)
    vol = read_image(folder)
    assert vol.modality == "MR" and vol.units == "a.u."
    with pytest.raises(InputError) as exc:
        read_image(folder, modality="ct")
    assert exc.value.field == "Modality"


# --------------------------------------------------------------------------- #
# NIfTI & friends
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_read_image_sitk_formats_roundtrip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    vol = Volume(array=rng.normal(size=(4, 5, 6)).astype(np.float32), spacing=(0.5, 0.75, 2.0),
                 origin=(1.0, -2.0, 3.0), direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(vol.to_sitk(), str(path))
    back = read_image(path, modality="mri")
    np.testing.assert_allclose(back.array, vol.array, atol=1e-6)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-5)
    assert back.modality == "MR" and back.units == "a.u." and back.source == str(path)


def test_read_image_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputError) as exc:
        read_image(bad, patient="P2")
    assert exc.value.file == str(bad) and exc.value.patient == "P2"
    with pytest.raises(InputError, match="unsupported image format"):
        (tmp_path / "x.png").write_bytes(b"")
        read_image(tmp_path / "x.png")


# --------------------------------------------------------------------------- #
# masks
# --------------------------------------------------------------------------- #
def test_empty_mask_is_an_error(tmp_path):
    ref = box_volume()
    path = write_label(tmp_path / "empty.nii.gz", np.zeros((20, 20, 20)), (1, 1, 1), (0, 0, 0))
    with pytest.raises(InputError, match="mask is empty") as exc:
        read_mask(path, ref, patient="P4")
    assert exc.value.file == str(path) and exc.value.patient == "P4"


def test_mask_not_overlapping_is_an_error(tmp_path):
    ref = box_volume()
    lab = np.zeros((5, 5, 5))
    lab[1:4, 1:4, 1:4] = 1
    path = write_label(tmp_path / "far.mha", lab, (2, 2, 2), (500.0, 500.0, 500.0))
    with pytest.raises(InputError, match="does not overlap"):
        read_mask(path, ref)


def test_mask_on_other_grid_is_resampled(tmp_path):
    ref = box_volume()  # 1 mm voxels, centres at 0..19 mm
    lab = np.zeros((5, 5, 5), np.uint8)
    lab[1:4, 1:4, 1:4] = 3  # any label > 0
    # 2 mm voxels, centres at 5.5 + 2 i: label voxels 1..3 cover [6.5, 12.5) mm -> ref centres 7..12
    path = write_label(tmp_path / "coarse.nii.gz", lab, (2, 2, 2), (5.5, 5.5, 5.5))
    got = read_mask(path, ref)
    expected = np.zeros((20, 20, 20), bool)
    expected[7:13, 7:13, 7:13] = True
    assert got.dtype == bool and got.shape == (20, 20, 20)
    np.testing.assert_array_equal(got, expected)
    # same physical ROI stored with a flipped x axis: identical result (physical-space resampling)
    flipped = write_label(tmp_path / "flipped.nrrd", lab[:, :, ::-1], (2, 2, 2), (13.5, 5.5, 5.5),
                          direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    np.testing.assert_array_equal(read_mask(flipped, ref), expected)
    # same grid: taken as is
    same = write_label(tmp_path / "same.nii.gz", expected, (1, 1, 1), (0, 0, 0))
    np.testing.assert_array_equal(read_mask(same, ref), expected)


# --------------------------------------------------------------------------- #
# preprocessing
# --------------------------------------------------------------------------- #
def test_anisotropic_sphere_resampled_to_1mm():
    spacing = (0.8, 0.8, 3.0)
    shape = (24, 72, 72)  # (z, y, x): 72 x 57.6 x 57.6 mm
    origin = np.array([-20.0, -25.0, -30.0])
    centre = np.array([9.13, 3.71, 7.4])  # off-grid
    radius = 12.0
    zz, yy, xx = np.indices(shape)
    pts = origin + np.stack([xx, yy, zz], -1) * np.array(spacing)
    sphere = np.linalg.norm(pts - centre, axis=-1) <= radius
    image = np.where(sphere, 100.0, -1000.0).astype(np.float32)
    vol = Volume(array=image, spacing=spacing, origin=tuple(origin), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                 modality="CT", units="HU")
    params = ImagingParams("ct", spacing=(1.0, 1.0, 1.0), size=(40, 40, 40))
    img, roi = preprocess(vol, sphere, params)
    assert img.shape == (1, 40, 40, 40) and roi.shape == (40, 40, 40)
    # the grid is centred on the mask centroid: recover the physical centroid of the output ROI
    mask_centroid = origin + np.argwhere(sphere).mean(0)[::-1] * np.array(spacing)
    out_offset = (np.argwhere(roi).mean(0)[::-1] - (np.array([40, 40, 40]) - 1) / 2) * 1.0
    assert np.all(np.abs(mask_centroid + out_offset - centre) < 0.5)
    true_volume = 4.0 / 3.0 * math.pi * radius**3
    assert abs(roi.sum() * 1.0 - true_volume) / true_volume < 0.05
    assert abs(roi.sum() - sphere.sum() * np.prod(spacing)) / (sphere.sum() * np.prod(spacing)) < 0.05
    # the image sphere follows the mask: linear interpolation of 100 HU inside
    inside = img[0][roi]
    assert np.median(inside) == pytest.approx((100 + 200) / 500)


def test_preprocess_ct_shape_range_and_centring():
    vol = box_volume(shape=(30, 40, 50), spacing=(0.9, 0.8, 2.0), modality="CT", units="HU")
    vol.array[:] = np.linspace(-1500, 2000, vol.array.size, dtype=np.float32).reshape(vol.array.shape)
    mask = np.zeros(vol.array.shape, bool)
    mask[10:14, 5:11, 30:36] = True  # off-centre ROI
    params = ImagingParams("ct", spacing=(1.5, 1.5, 1.5), size=(16, 12, 10))
    img, roi = preprocess(vol, mask, params)
    assert img.shape == (1, 10, 12, 16) and img.dtype == np.float32
    assert roi.shape == (10, 12, 16) and roi.dtype == bool
    assert img.min() >= 0.0 and img.max() <= 1.0
    centroid = np.argwhere(roi).mean(0)
    np.testing.assert_allclose(centroid, (np.array(roi.shape) - 1) / 2, atol=0.5)
    # no mask: volume centre, empty ROI; far outside the FOV = -1000 HU -> 0
    img2, roi2 = preprocess(vol, None, ImagingParams("ct", spacing=(10.0, 10.0, 10.0), size=(20, 20, 20)))
    assert not roi2.any() and img2[0, 0, 0, 0] == pytest.approx(0.0)


def test_preprocess_pet_and_mri_normalisation():
    rng = np.random.default_rng(1)
    arr = np.abs(rng.normal(2.0, 1.0, size=(20, 20, 20))).astype(np.float32)
    pet = box_volume(modality="PT", units="SUVbw")
    pet.array[:] = arr
    img_log, _ = preprocess(pet, None, ImagingParams("pet", spacing=(1, 1, 1), size=(20, 20, 20)))
    np.testing.assert_allclose(img_log[0], np.log1p(arr), atol=1e-5)
    img_clip, _ = preprocess(pet, None, ImagingParams("pet", spacing=(1, 1, 1), size=(20, 20, 20),
                                                       pet_compression="clip", pet_clip=3.0))
    np.testing.assert_allclose(img_clip[0], np.minimum(arr, 3.0) / 3.0, atol=1e-6)

    mr = box_volume(modality="MR", units="a.u.")
    mr.array[:] = 5.0 + rng.normal(0, 0.5, size=(20, 20, 20))  # background
    mr.array[5:15, 5:15, 5:15] = 500.0 + rng.normal(0, 20.0, size=(10, 10, 10))  # foreground
    img, _ = preprocess(mr, None, ImagingParams("mri", spacing=(1, 1, 1), size=(20, 20, 20)))
    fg = img[0, 5:15, 5:15, 5:15]
    assert abs(fg.mean()) < 1e-3 and fg.std() == pytest.approx(1.0, rel=1e-3)
    assert img[0, 0, 0, 0] < -10  # background keeps its (very negative) z-score


def test_preprocess_pet_reference_cancels_a_global_calibration_factor():
    """pet_reference='body_median': the image is SUV / median body SUV, so a scanner that reads every SUV
    1.25x too high gives the same image; air (SUV ~ 0) is not part of the reference."""
    rng = np.random.default_rng(2)
    suv = np.zeros((20, 20, 20), np.float32)                      # air
    suv[2:18, 2:18, 2:18] = rng.uniform(0.8, 1.2, (16, 16, 16))   # body
    suv[8:12, 8:12, 8:12] = 6.0                                   # lesion
    body = suv[suv >= 0.3]
    ref = float(np.median(body))
    params = ImagingParams("pet", spacing=(1, 1, 1), size=(20, 20, 20), pet_reference="body_median")
    images = []
    for factor in (1.0, 1.25):
        pet = box_volume(modality="PT", units="SUVbw")
        pet.array[:] = suv * factor
        img, _ = preprocess(pet, None, params)
        images.append(img[0])
    np.testing.assert_allclose(images[0], np.log1p(suv / ref), atol=1e-5)   # tumour-to-background ratio
    np.testing.assert_allclose(images[1], images[0], atol=1e-5)
    assert np.expm1(images[0][10, 10, 10]) == pytest.approx(6.0 / ref, rel=1e-5)
    # default: absolute SUV, and the cache key of the default params is what it was before the option
    assert "pet_reference" not in ImagingParams("pet").to_json()
    assert "body_median" in params.to_json()
    # a PET with no body (all air) is refused, naming the field
    empty = box_volume(modality="PT", units="SUVbw")
    empty.array[:] = 0.0
    with pytest.raises(InputError) as exc:
        preprocess(empty, None, params, patient="P1")
    assert exc.value.field == "pet_reference" and exc.value.patient == "P1"
    with pytest.raises(InputError) as exc:
        ImagingParams("pet", pet_reference="liver")
    assert exc.value.field == "pet_reference"


def test_preprocess_rejects_wrong_units_and_params():
    with pytest.raises(InputError) as exc:
        preprocess(box_volume(modality="CT", units="a.u."), None, ImagingParams("ct"))
    assert exc.value.field == "units"
    with pytest.raises(InputError) as exc:
        preprocess(box_volume(modality="MR"), None, ImagingParams("ct"))
    assert exc.value.field == "modality"
    with pytest.raises(InputError) as exc:
        ImagingParams("xray")
    assert exc.value.field == "modality"
    with pytest.raises(ValueError, match="size"):
        ImagingParams("ct", size=(24, 0, 24))
    with pytest.raises(ValueError, match="pet_compression"):
        ImagingParams("pet", pet_compression="sqrt")
    with pytest.raises(InputError, match="mask shape"):
        preprocess(box_volume(modality="CT", units="HU"), np.ones((2, 2, 2), bool), ImagingParams("ct"))


# --------------------------------------------------------------------------- #
# cache
# --------------------------------------------------------------------------- #
def _ct_with_mask(tmp_path: Path) -> tuple[Path, Path]:
    folder, _, _ = write_series(tmp_path / "ct", n_slices=8, rows=16, cols=16, z_spacing=2.0)
    vol = read_dicom_series(folder)
    lab = np.zeros(vol.array.shape, np.uint8)
    lab[2:6, 4:12, 5:11] = 1
    mask = write_label(tmp_path / "roi.nii.gz", lab, vol.spacing, vol.origin, vol.direction)
    return folder, mask


def test_cache_hit_decodes_nothing(tmp_path, monkeypatch):
    folder, mask = _ct_with_mask(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    params = ImagingParams("ct", spacing=(1.0, 1.0, 2.0), size=(12, 10, 8))
    first = cache.load_preprocessed(folder, mask, params, patient="P1")
    assert not first.cache_hit
    assert first.image.shape == (1, 8, 10, 12) and first.roi.any()
    key = cache.key(folder, mask, params)
    assert (tmp_path / "cache" / key[:2] / f"{key}.npz").is_file()
    assert (tmp_path / "cache" / key[:2] / f"{key}.json").is_file()

    def boom(*args, **kwargs):
        raise AssertionError("decoder called on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(pydicom, "dcmread", boom)
        m.setattr(sitk, "ReadImage", boom)
        m.setattr(sitk, "ImageSeriesReader", boom)
        second = cache.load_preprocessed(folder, mask, params, patient="P1")
    assert second.cache_hit
    np.testing.assert_array_equal(second.image, first.image)
    np.testing.assert_array_equal(second.roi, first.roi)
    assert second.image.dtype == np.float32 and second.roi.dtype == bool
    assert second.uid_hashes == first.uid_hashes and "SeriesInstanceUID" in second.uid_hashes


def test_cache_keeps_the_grid_geometry_and_upgrades_old_entries(tmp_path):
    folder, mask = _ct_with_mask(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    params = ImagingParams("ct", spacing=(1.0, 1.0, 2.0), size=(12, 10, 8))
    first = cache.load_preprocessed(folder, mask, params, roi=1)
    # the grid puts the arrays where they lie in the scan: SimpleITK resampling of the scan's mask onto it
    # gives the preprocessed ROI
    grid = first.grid
    ref = sitk.Image(12, 10, 8, sitk.sitkUInt8)
    ref.SetSpacing(grid["spacing"])
    ref.SetOrigin(grid["origin"])
    ref.SetDirection(grid["direction"])
    on_grid = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(mask)), ref, sitk.Transform(),
                                                   sitk.sitkNearestNeighbor, 0))
    np.testing.assert_array_equal(on_grid > 0, first.roi)
    assert cache.load_preprocessed(folder, mask, params, roi=1).grid == grid
    # an entry written before the grid was kept is recomputed once (with the same ROI selection), then hit
    key = cache.key(folder, mask, params, roi=1)
    _, meta_path = cache.paths(key)
    meta = json.loads(meta_path.read_text())
    del meta["grid"]
    meta_path.write_text(json.dumps(meta))
    again = cache.load_preprocessed(folder, mask, params, roi=1)
    assert not again.cache_hit and again.grid == grid
    np.testing.assert_array_equal(again.roi, first.roi)
    assert cache.load_preprocessed(folder, mask, params, roi=1).cache_hit


def test_cache_invalidated_by_params_and_content(tmp_path):
    folder, mask = _ct_with_mask(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    params = ImagingParams("ct", spacing=(1.0, 1.0, 2.0), size=(12, 10, 8))
    base = cache.load_preprocessed(folder, mask, params)
    assert cache.load_preprocessed(folder, mask, params).cache_hit
    # other params -> miss
    other = ImagingParams("ct", spacing=(1.0, 1.0, 2.0), size=(12, 10, 8), ct_window=(-100.0, 100.0))
    assert not cache.load_preprocessed(folder, mask, other).cache_hit
    # no mask -> different entry
    assert not cache.load_preprocessed(folder, None, params).cache_hit
    # one file's bytes change -> miss, and the new content is used (slice k=3 lies inside the ROI crop)
    f = next(p for p in folder.iterdir() if float(pydicom.dcmread(p).ImagePositionPatient[2]) == 36.0)
    ds = pydicom.dcmread(f)
    ds.RescaleIntercept = "0"
    ds.save_as(f, enforce_file_format=True)
    changed = cache.load_preprocessed(folder, mask, params)
    assert not changed.cache_hit
    assert not np.array_equal(changed.image, base.image)
    # the mask's bytes change -> miss
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
    lab[3, 5, 6] = 0
    ref = sitk.ReadImage(str(mask))
    new = sitk.GetImageFromArray(lab)
    new.CopyInformation(ref)
    sitk.WriteImage(new, str(mask))
    assert not cache.load_preprocessed(folder, mask, params).cache_hit


def test_cache_works_with_nifti(tmp_path, monkeypatch):
    vol = box_volume(modality="PT", units="SUVbw")
    vol.array[8:12, 8:12, 8:12] = 5.0
    path = tmp_path / "pet.nii.gz"
    sitk.WriteImage(vol.to_sitk(), str(path))
    cache = VolumeCache(tmp_path / "cache")
    params = ImagingParams("pet", spacing=(2, 2, 2), size=(8, 8, 8))
    first = cache.load_preprocessed(path, None, params)
    monkeypatch.setattr(sitk, "ReadImage", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    second = cache.load_preprocessed(path, None, params)
    assert second.cache_hit and not first.cache_hit and first.uid_hashes == {}
    np.testing.assert_array_equal(first.image, second.image)


# --------------------------------------------------------------------------- #
# privacy
# --------------------------------------------------------------------------- #
PHI = ["DOE^JOHN", "DOE", "PID-998877", "19500101", "Privacy Lane"]


def test_no_phi_in_volume_cache_logs_or_errors(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    folder, _, uids = write_series(tmp_path / "phi", n_slices=4, rows=12, cols=12,
                                   patient_name="DOE^JOHN", patient_id="PID-998877")
    vol = read_dicom_series(folder)
    text = repr(vol) + str(vol.uid_hashes) + vol.units + vol.modality
    for s in PHI + list(uids.values()):
        assert s not in text
    cache = VolumeCache(tmp_path / "cache")
    res = cache.load_preprocessed(folder, None, ImagingParams("ct", size=(8, 8, 8)))
    assert all(s not in repr(res) for s in PHI)
    for f in (tmp_path / "cache").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for s in PHI + list(uids.values()):
                assert s.encode() not in data, f"{s} leaked into {f.name}"
    meta = json.loads(next((tmp_path / "cache").rglob("*.json")).read_text())
    assert set(meta["uid_hashes"]) == {"StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"}
    # errors on a PHI series do not echo it either
    os.remove(sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))[1])
    with pytest.raises(InputError) as exc:
        read_dicom_series(folder)
    assert all(s not in str(exc.value) for s in PHI)
    assert all(s not in caplog.text for s in PHI)


# --------------------------------------------------------------------------- #
# speed paths: native pixel decoding, cropping before resampling
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("signed, bits, stored", [(1, 16, 16), (1, 16, 12), (0, 16, 12), (0, 16, 16), (0, 8, 8),
                                                  (1, 32, 32)])
def test_native_decode_matches_pydicom(signed, bits, stored):
    rng = np.random.default_rng(bits + stored + signed)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    info = np.iinfo(dtype)
    raw = rng.integers(info.min, info.max, size=(3, 5, 7), dtype=dtype, endpoint=True)  # high bits set too
    uids = {"study": generate_uid(), "series": generate_uid(), "for": generate_uid()}
    ds = make_slice(modality="CT", pixels=np.zeros((5, 7), np.int16), position=(0, 0, 0), uids=uids)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, signed
    ds.NumberOfFrames = 3
    ds.PixelData = raw.tobytes()
    fast = imaging._decode_native(ds)
    assert fast is not None and fast.shape == (3, 5, 7)
    np.testing.assert_array_equal(fast, ds.pixel_array)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"  # compressed: left to pydicom
    assert imaging._decode_native(ds) is None


def test_preprocess_crop_gives_the_full_resample():
    rng = np.random.default_rng(7)
    c, s = math.cos(0.4), math.sin(0.4)
    vol = Volume(array=rng.normal(0, 300, size=(30, 40, 50)).astype(np.float32), spacing=(0.8, 0.9, 2.5),
                 origin=(-10.0, 5.0, 3.0), direction=(c, -s, 0, s, c, 0, 0, 0, 1), modality="CT", units="HU")
    mask = np.zeros(vol.array.shape, bool)
    mask[2:5, 30:36, 1:4] = True  # near a corner: the grid leaves the field of view
    params = ImagingParams("ct", spacing=(1.3, 1.1, 1.7), size=(20, 18, 16), ct_window=(-500.0, 500.0))
    img, roi = preprocess(vol, mask, params)
    # reference: resample the whole volume onto the same grid
    centre = vol.index_to_physical(np.argwhere(mask).mean(axis=0)[::-1])[0]
    out_origin = centre - vol.direction_matrix @ (np.array(params.spacing) * (np.array(params.size) - 1) / 2)
    ref = sitk.Resample(vol.to_sitk(), list(params.size), sitk.Transform(), sitk.sitkLinear, out_origin.tolist(),
                        list(params.spacing), vol.direction, -1000.0, sitk.sitkFloat32)
    expected = (np.clip(sitk.GetArrayFromImage(ref), -500, 500) + 500) / 1000
    np.testing.assert_allclose(img[0], expected, atol=1e-6)
    m = sitk.GetImageFromArray(mask.astype(np.uint8))
    m.CopyInformation(vol.to_sitk())
    ref_roi = sitk.Resample(m, list(params.size), sitk.Transform(), sitk.sitkNearestNeighbor, out_origin.tolist(),
                            list(params.spacing), vol.direction, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(roi, sitk.GetArrayFromImage(ref_roi).astype(bool))
