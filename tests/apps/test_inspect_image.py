"""``radfusion inspect-image``: geometry against SimpleITK, JSON keys, problems, exit status 2 on bad input."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from apps.inspect_image import add_parser, inspect, run
from data_adapters.privacy import hash_uid

KEYS = {"modality", "size", "spacing", "origin", "direction", "min", "max", "units", "series_uid_hash", "problems"}
PHI = ["DOE^JOHN", "PID-31337", "19440606"]


@pytest.fixture(autouse=True)
def _salt(monkeypatch):
    monkeypatch.setenv("RADFUSION_SALT", "test-salt")


def write_ct(folder: Path, *, n=6, rows=12, cols=10, spacing=(0.7, 0.6), dz=2.5, origin=(-10.0, 20.0, 30.0),
             orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), series=None, pad=False) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    series = series or generate_uid()
    study, for_uid = generate_uid(), generate_uid()
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, for_uid
        pos = np.asarray(origin) + k * dz * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # (row, column) spacing
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        px = (np.arange(rows * cols).reshape(rows, cols) * 10 + 100 * k).astype("<i2")
        if pad:
            px[0, 0] = -2000  # a padding value below air
        ds.PixelData = px.tobytes()
        ds.save_as(folder / f"{generate_uid()[-12:]}.dcm", enforce_file_format=True)
    return folder, series


def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _parse(argv):
    parser = argparse.ArgumentParser(prog="radfusion")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _assert_geometry(report, img: sitk.Image):
    assert report["size"] == list(img.GetSize())
    np.testing.assert_allclose(report["spacing"], img.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(report["origin"], img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(report["direction"], img.GetDirection(), atol=1e-4)


@pytest.mark.parametrize("oblique", [False, True])
def test_dicom_series_json_matches_simpleitk(tmp_path, capsys, oblique):
    c, s = math.cos(0.3), math.sin(0.3)
    orientation = (c, s, 0.0, 0.0, 0.0, -1.0) if oblique else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    folder, series = write_ct(tmp_path / "ct", orientation=orientation)
    args = _parse(["inspect-image", str(folder), "--json"])
    assert args.func is run
    assert run(args) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert set(report) == KEYS
    ref = sitk_series(folder)
    _assert_geometry(report, ref)
    arr = sitk.GetArrayFromImage(ref)
    assert report["min"] == pytest.approx(float(arr.min())) and report["max"] == pytest.approx(float(arr.max()))
    assert report["modality"] == "CT" and report["units"] == "HU"
    assert report["series_uid_hash"] == hash_uid(series)
    assert len(report["direction"]) == 9
    assert any("oblique" in p for p in report["problems"]) == oblique
    assert all(s not in out for s in PHI + [series])


def test_table_output_and_problems(tmp_path, capsys):
    folder, _ = write_ct(tmp_path / "ct", dz=5.0, spacing=(0.5, 0.5), pad=True)
    assert run(_parse(["inspect-image", str(folder)])) == 0
    out = capsys.readouterr().out
    assert "size (x, y, z)" in out and "10 x 12 x 6" in out and "HU" in out
    assert "outside the plausible range" in out  # -3024 HU padding
    assert "anisotropic" in out  # 0.5 x 0.5 x 5 mm
    assert all(s not in out for s in PHI)


def test_nifti_matches_simpleitk(tmp_path, capsys):
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.normal(2.0, 1.0, size=(5, 7, 9)).astype(np.float32))
    img.SetSpacing((1.5, 0.75, 3.0))
    img.SetOrigin((12.0, -4.0, 8.5))
    img.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    path = tmp_path / "pet.nii.gz"
    sitk.WriteImage(img, str(path))
    ref = sitk.ReadImage(str(path))
    assert run(_parse(["inspect-image", str(path), "--modality", "pet", "--json"])) == 0
    report = json.loads(capsys.readouterr().out)
    _assert_geometry(report, ref)
    assert report["modality"] == "PT" and report["units"] == "SUVbw" and report["series_uid_hash"] is None
    arr = sitk.GetArrayFromImage(ref)
    assert report["min"] == pytest.approx(float(arr.min())) and report["max"] == pytest.approx(float(arr.max()))
    # without --modality the units are unknown: reported as a problem
    assert any("units unknown" in p for p in inspect(str(path))["problems"])


def test_bad_folder_exits_2_with_the_reason(tmp_path, capsys):
    folder, _ = write_ct(tmp_path / "two", n=3)
    write_ct(folder, n=2)  # a second series in the same folder
    assert run(_parse(["inspect-image", str(folder), "--json"])) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "found 2 DICOM series" in captured.err and str(folder) in captured.err
    assert all(s not in captured.err for s in PHI)
    assert run(_parse(["inspect-image", str(tmp_path / "missing.nii.gz")])) == 2
    assert "does not exist" in capsys.readouterr().err
