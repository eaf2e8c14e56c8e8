"""DICOM SEG and RTSTRUCT readers (data_adapters.roi) and read_mask's dispatch to them.

Real files: pydicom's ``rtstruct.dcm`` and pydicom-data's ``liver.dcm`` SEG
(their referenced CT series are not distributed, so the reference volumes are
synthetic with the matching geometry and FrameOfReferenceUID).  Synthetic
RTSTRUCT/SEG files written with pydicom check areas against analytic values
and a SEG round trip.
"""
from __future__ import annotations

import math
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
    RTStructureSetStorage,
    SegmentationStorage,
    generate_uid,
)

from data_adapters.errors import InputError
from data_adapters.imaging import ImagingParams, Volume, VolumeCache, read_image, read_mask
from data_adapters.privacy import hash_uid
from data_adapters.roi import dicom_roi_kind, fill_polygon, list_rois, read_rtstruct, read_seg

PHI = ["DOE^JANE", "PID-424242", "19610203"]


@pytest.fixture(autouse=True)
def _salt(monkeypatch):
    monkeypatch.setenv("RADFUSION_SALT", "test-salt")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _testdata(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return path


def ref_volume(shape, spacing, origin, *, for_uid: str | None, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Volume:
    uids = {} if for_uid is None else {"FrameOfReferenceUID": hash_uid(for_uid)}
    return Volume(array=np.zeros(shape, np.float32), spacing=spacing, origin=origin, direction=direction,
                  modality="CT", units="HU", uid_hashes=uids)


def _base(sop_class: str, modality: str, for_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "PID-424242"
    ds.PatientBirthDate = "19610203"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = for_uid
    return ds


def write_seg(path: Path, frames, *, rows: int, cols: int, pixel_spacing=(1.0, 1.0), for_uid: str,
              labels=None, seg_type: str = "BINARY", orientation=(1, 0, 0, 0, 1, 0), slice_step=None) -> Path:
    """A DICOM SEG; ``frames`` = [(segment_number, position_xyz, array (rows, cols))]."""
    from pydicom.pixels import pack_bits

    labels = labels or {1: "Tumour", 2: "Liver"}
    ds = _base(SegmentationStorage, "SEG", for_uid)
    ds.SegmentationType = seg_type
    if seg_type == "FRACTIONAL":
        ds.SegmentationFractionalType = "PROBABILITY"
        ds.MaximumFractionalValue = 255
    segs = []
    for n, label in labels.items():
        item = Dataset()
        item.SegmentNumber = n
        item.SegmentLabel = label
        item.SegmentAlgorithmType = "MANUAL"
        segs.append(item)
    ds.SegmentSequence = Sequence(segs)
    shared = Dataset()
    po = Dataset()
    po.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    pm = Dataset()
    pm.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    pm.SliceThickness = "1.0"
    if slice_step is not None:
        pm.SpacingBetweenSlices = f"{slice_step}"
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelMeasuresSequence = Sequence([pm])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for number, pos, _ in frames:
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        sid = Dataset()
        sid.ReferencedSegmentNumber = number
        item.PlanePositionSequence = Sequence([pp])
        item.SegmentIdentificationSequence = Sequence([sid])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    stack = np.stack([np.asarray(a) for _, _, a in frames])
    if seg_type == "FRACTIONAL":
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = stack.astype(np.uint8).tobytes()
    else:
        ds.BitsAllocated = ds.BitsStored = 1
        ds.HighBit = 0
        ds.PixelData = pack_bits(stack.astype(np.uint8).ravel())
    ds.save_as(path, enforce_file_format=True)
    return path


def write_rtstruct(path: Path, rois, *, for_uid: str) -> Path:
    """An RTSTRUCT; ``rois`` = [(number, name, [contour points (N, 3) mm or ("POINT", (3,))])]."""
    ds = _base(RTStructureSetStorage, "RTSTRUCT", for_uid)
    del ds.FrameOfReferenceUID  # RTSTRUCT carries it per ROI and in ReferencedFrameOfReferenceSequence
    ref = Dataset()
    ref.FrameOfReferenceUID = for_uid
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref])
    ss, rc_items = [], []
    for number, name, contours in rois:
        item = Dataset()
        item.ROINumber = number
        item.ROIName = name
        item.ReferencedFrameOfReferenceUID = for_uid
        ss.append(item)
        rc = Dataset()
        rc.ReferencedROINumber = number
        seq = []
        for c in contours:
            ci = Dataset()
            if isinstance(c, tuple) and c[0] == "POINT":
                ci.ContourGeometricType = "POINT"
                pts = np.asarray(c[1], float).reshape(1, 3)
            else:
                ci.ContourGeometricType = "CLOSED_PLANAR"
                pts = np.asarray(c, float)
            ci.NumberOfContourPoints = len(pts)
            ci.ContourData = [f"{v:.4f}" for v in pts.ravel()]
            seq.append(ci)
        rc.ContourSequence = Sequence(seq)
        rc_items.append(rc)
    ds.StructureSetROISequence = Sequence(ss)
    ds.ROIContourSequence = Sequence(rc_items)
    ds.save_as(path, enforce_file_format=True)
    return path


def circle(cx, cy, z, r, n=180):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t), np.full(n, z)], axis=1)


def square(cx, cy, z, half):
    return np.array([[cx - half, cy - half, z], [cx + half, cy - half, z], [cx + half, cy + half, z],
                     [cx - half, cy + half, z]], float)


def write_ct_series(folder: Path, *, shape=(10, 16, 16), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
                    for_uid: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for k in range(shape[0]):
        ds = _base(CTImageStorage, "CT", for_uid)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (origin[0], origin[1], origin[2] + k * spacing[2])]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
        ds.Rows, ds.Columns = shape[1], shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.PixelData = np.full(shape[1:], 1024 + 40 * k, "<i2").tobytes()
        ds.save_as(folder / f"ct{k:03d}.dcm", enforce_file_format=True)
    return folder


# --------------------------------------------------------------------------- #
# real DICOM SEG (pydicom-data liver.dcm: 3 frames of 512 x 512, one segment 'Liver')
# --------------------------------------------------------------------------- #
LIVER_ORIGIN = (-235.2, -226.8, -128.69)
LIVER_SPACING = (0.810547, 0.810547, 1.0)


def _liver():
    path = _testdata("liver.dcm")
    ds = pydicom.dcmread(path)
    return path, ds


def test_real_seg_frames_land_on_their_slices():
    path, ds = _liver()
    # reference CT: 5 slices, one below and one above the 3 segmented ones
    ref = ref_volume((5, 512, 512), LIVER_SPACING, (LIVER_ORIGIN[0], LIVER_ORIGIN[1], LIVER_ORIGIN[2] - 1.0),
                     for_uid=ds.FrameOfReferenceUID)
    mask, uids = read_seg(path, ref)
    expected = np.zeros((5, 512, 512), bool)
    expected[1:4] = ds.pixel_array.astype(bool)  # frames at z = -128.69, -127.69, -126.69
    np.testing.assert_array_equal(mask, expected)
    assert int(mask.sum()) == 107098
    assert set(uids) == {"mask.StudyInstanceUID", "mask.SeriesInstanceUID", "mask.FrameOfReferenceUID"}
    assert uids["mask.FrameOfReferenceUID"] == hash_uid(ds.FrameOfReferenceUID)
    # selecting the segment by number or (case-insensitive) label gives the same mask; read_mask dispatches
    np.testing.assert_array_equal(read_seg(path, ref, segment=1)[0], expected)
    np.testing.assert_array_equal(read_mask(path, ref, roi="liver"), expected)
    assert list_rois(path) == [(1, "Liver")]
    assert dicom_roi_kind(path)[0] == "SEG"


def test_real_big_endian_seg_is_identical():
    path, ds = _liver()
    ref = ref_volume((3, 512, 512), LIVER_SPACING, LIVER_ORIGIN, for_uid=ds.FrameOfReferenceUID)
    np.testing.assert_array_equal(read_mask(_testdata("liver_expb.dcm"), ref), read_mask(path, ref))


def test_real_seg_on_a_coarser_grid_is_resampled():
    path, ds = _liver()
    ref = ref_volume((3, 256, 256), (2 * LIVER_SPACING[0], 2 * LIVER_SPACING[1], 1.0),
                     (LIVER_ORIGIN[0] + LIVER_SPACING[0] / 2, LIVER_ORIGIN[1] + LIVER_SPACING[1] / 2, LIVER_ORIGIN[2]),
                     for_uid=ds.FrameOfReferenceUID)
    mask = read_mask(path, ref)
    assert mask.shape == (3, 256, 256)
    assert abs(mask.sum() * 4 - 107098) / 107098 < 0.03  # same physical area within 3 %


def test_real_seg_errors():
    path, ds = _liver()
    ref = ref_volume((3, 512, 512), LIVER_SPACING, LIVER_ORIGIN, for_uid=ds.FrameOfReferenceUID)
    with pytest.raises(InputError, match=r"segment 'Spleen' not found.*1: 'Liver'") as exc:
        read_mask(path, ref, roi="Spleen", patient="P1")
    assert exc.value.patient == "P1" and exc.value.file == str(path)
    other_for = ref_volume((3, 512, 512), LIVER_SPACING, LIVER_ORIGIN, for_uid=generate_uid())
    with pytest.raises(InputError) as exc:
        read_mask(path, other_for)
    assert exc.value.field == "FrameOfReferenceUID"
    far = ref_volume((3, 64, 64), (1.0, 1.0, 1.0), (1000.0, 1000.0, 1000.0), for_uid=ds.FrameOfReferenceUID)
    with pytest.raises(InputError, match="does not overlap"):
        read_mask(path, far)
    # pydicom's liver_1frame.dcm declares 3 per-frame items for 1 frame of pixel data
    with pytest.raises(InputError) as exc:
        read_mask(_testdata("liver_1frame.dcm"), ref)
    assert exc.value.field == "PerFrameFunctionalGroupsSequence"


# --------------------------------------------------------------------------- #
# real RTSTRUCT (pydicom rtstruct.dcm: 'patient' = 400 x 300 mm rectangles at z = -200, -190, -180)
# --------------------------------------------------------------------------- #
def _rt():
    path = _testdata("rtstruct.dcm")
    ds = pydicom.dcmread(path, force=True)  # the file has no DICOM preamble
    for_uid = str(ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID)
    return path, for_uid


def test_real_rtstruct_rectangles_have_the_analytic_area():
    path, for_uid = _rt()
    ref = ref_volume((5, 256, 256), (2.0, 2.0, 10.0), (-255.0, -255.0, -210.0), for_uid=for_uid)
    mask, uids = read_rtstruct(path, ref, roi="patient")
    areas = mask.sum(axis=(1, 2)) * 4.0  # mm^2
    np.testing.assert_array_equal(areas, [0, 120000, 120000, 120000, 0])  # 400 mm x 300 mm
    # centred on (0, 0): columns of voxel centres -199..199 mm, rows -149..149 mm
    ys, xs = np.nonzero(mask[1])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (28, 227, 53, 202)
    assert "mask.FrameOfReferenceUID" in uids and "mask.SeriesInstanceUID" in uids
    # the default (union of ROIs with closed contours) is the same: the isocentres are points
    np.testing.assert_array_equal(read_mask(path, ref), mask)
    assert [name for _, name in list_rois(path)] == ["patient", "Isocenter 1", "Isocenter 2"]


def test_real_rtstruct_fills_thin_slices_between_contour_planes():
    path, for_uid = _rt()
    # 2 mm slices from -210 to -170: contour planes every 10 mm cover -205..-175 (half a plane spacing)
    ref = ref_volume((21, 128, 128), (4.0, 4.0, 2.0), (-254.0, -254.0, -210.0), for_uid=for_uid)
    mask = read_mask(path, ref)
    filled = np.nonzero(mask.any(axis=(1, 2)))[0]
    z = -210.0 + 2.0 * filled
    assert z.min() == -204.0 and z.max() == -176.0 and len(filled) == 15


def test_real_rtstruct_errors():
    path, for_uid = _rt()
    ref = ref_volume((5, 256, 256), (2.0, 2.0, 10.0), (-255.0, -255.0, -210.0), for_uid=for_uid)
    with pytest.raises(InputError) as exc:
        read_mask(path, ref, roi="GTV")
    assert exc.value.field == "ROIName"
    for name in ("'patient'", "'Isocenter 1'", "'Isocenter 2'"):
        assert name in str(exc.value)
    with pytest.raises(InputError) as exc:
        read_mask(path, ref, roi="Isocenter 1")  # a POINT ROI is not an area
    assert exc.value.field == "ContourGeometricType"
    with pytest.raises(InputError) as exc:
        read_mask(path, ref_volume((5, 256, 256), (2.0, 2.0, 10.0), (-255.0, -255.0, -210.0),
                                   for_uid=generate_uid()))
    assert exc.value.field == "ReferencedFrameOfReferenceUID"
    with pytest.raises(InputError, match="does not overlap"):
        read_mask(path, ref_volume((5, 32, 32), (2.0, 2.0, 10.0), (500.0, 500.0, 500.0), for_uid=for_uid))


# --------------------------------------------------------------------------- #
# synthetic RTSTRUCT: sphere, square with a hole, oblique grid
# --------------------------------------------------------------------------- #
def test_synthetic_rtstruct_sphere_volume_and_square_with_hole(tmp_path):
    for_uid = generate_uid()
    spacing = (0.8, 0.8, 2.0)
    origin = (-40.0, -40.0, -30.0)
    ref = ref_volume((31, 101, 101), spacing, origin, for_uid=for_uid)
    centre, radius = np.array([3.3, -2.1, 0.0]), 20.0
    zs = origin[2] + spacing[2] * np.arange(31)
    sphere = [circle(centre[0], centre[1], z, math.sqrt(radius**2 - (z - centre[2]) ** 2))
              for z in zs if abs(z - centre[2]) < radius]
    outer, inner = square(0.0, 0.0, 20.0, 12.0), square(1.0, 1.0, 20.0, 4.0)
    rt = write_rtstruct(tmp_path / "rt.dcm", [(1, "GTV", sphere), (2, "Ring", [outer, inner])], for_uid=for_uid)
    assert dicom_roi_kind(rt) == ("RTSTRUCT", rt)

    gtv = read_mask(rt, ref, roi="GTV")
    voxel = float(np.prod(spacing))
    # each slice: area of the disc of radius sqrt(r^2 - z^2) within 2 %
    for k, z in enumerate(zs):
        rz2 = radius**2 - (z - centre[2]) ** 2
        if rz2 > 100:
            assert abs(gtv[k].sum() * 0.64 - math.pi * rz2) / (math.pi * rz2) < 0.02
    # whole sphere (slab sum of 2 mm slices) within 3 % of 4/3 pi r^3
    true = 4.0 / 3.0 * math.pi * radius**3
    assert abs(gtv.sum() * voxel - true) / true < 0.03
    # the centroid is where the sphere is
    c = ref.index_to_physical(np.argwhere(gtv).mean(axis=0)[::-1])[0]
    np.testing.assert_allclose(c, centre, atol=0.3)

    ring = read_mask(rt, ref, roi=2)  # by ROINumber
    k = int(round((20.0 - origin[2]) / spacing[2]))
    assert ring.sum(axis=(1, 2)).nonzero()[0].tolist() == [k]
    assert abs(ring[k].sum() * 0.64 - (24.0**2 - 8.0**2)) / (24.0**2 - 8.0**2) < 0.03  # even-odd: hole
    # union default = both ROIs
    np.testing.assert_array_equal(read_mask(rt, ref), gtv | ring)


def test_synthetic_rtstruct_on_oblique_grid(tmp_path):
    for_uid = generate_uid()
    a = math.radians(30)
    direction = (math.cos(a), -math.sin(a), 0, math.sin(a), math.cos(a), 0, 0, 0, 1)
    ref = ref_volume((5, 80, 80), (0.5, 0.5, 3.0), (0.0, 0.0, 0.0), for_uid=for_uid, direction=direction)
    # a 16 mm square drawn in physical space around the grid centre, rotated like the grid
    centre_idx = np.array([39.5, 39.5, 2.0])
    centre = ref.index_to_physical(centre_idx)[0]
    d = ref.direction_matrix
    corners = [centre + d @ np.array([sx * 8.0, sy * 8.0, 0.0]) for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    rt = write_rtstruct(tmp_path / "rt.dcm", [(1, "Box", [np.array(corners)])], for_uid=for_uid)
    mask = read_mask(rt, ref)
    assert mask[2].sum() * 0.25 == pytest.approx(256.0, rel=0.02)
    assert mask.sum(axis=(1, 2)).nonzero()[0].tolist() == [2]


def test_contour_not_parallel_to_slices_is_an_error(tmp_path):
    for_uid = generate_uid()
    ref = ref_volume((10, 20, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), for_uid=for_uid)
    tilted = np.array([[2, 2, 2], [15, 2, 2], [15, 15, 8], [2, 15, 8]], float)
    rt = write_rtstruct(tmp_path / "rt.dcm", [(1, "Tilted", [tilted])], for_uid=for_uid)
    with pytest.raises(InputError) as exc:
        read_mask(rt, ref)
    assert exc.value.field == "ContourData"


def test_fill_polygon_matches_matplotlib_even_odd():
    from matplotlib.path import Path as MplPath

    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 2 * np.pi, 40))
    r = rng.uniform(8, 30, 40)
    poly = np.stack([40.3 + r * np.cos(t), 35.7 + r * np.sin(t)], axis=1)
    ours = fill_polygon(poly, (80, 90))
    yy, xx = np.mgrid[0:80, 0:90]
    ref = MplPath(poly).contains_points(np.stack([xx.ravel(), yy.ravel()], 1)).reshape(80, 90)
    assert (ours != ref).sum() <= 2  # only pixel centres lying exactly on an edge may differ
    # a self-overlapping pentagram: the even-odd rule leaves the centre pentagon empty
    ang = np.pi / 2 + np.arange(5) * 4 * np.pi / 5
    star = np.stack([50 + 40 * np.cos(ang), 50 + 40 * np.sin(ang)], 1)
    filled = fill_polygon(star, (101, 101))
    assert not filled[50, 50] and filled[50 + 30, 50]
    assert not fill_polygon(np.array([[0, 0], [5, 5]]), (8, 8)).any()


# --------------------------------------------------------------------------- #
# synthetic SEG round trip
# --------------------------------------------------------------------------- #
def _label_volume(shape=(8, 13, 11)):
    zz, yy, xx = np.indices(shape)
    tumour = ((zz - 3) ** 2 + (yy - 6) ** 2 + (xx - 5) ** 2) <= 6  # segment 1
    liver = (zz >= 2) & (zz <= 5) & (yy <= 3) & (xx >= 6)  # segment 2
    return tumour, liver


def _seg_frames(tumour, liver, origin, spacing):
    frames = []
    for number, seg in ((2, liver), (1, tumour)):  # segment 2 first, frames unsorted
        for k in np.nonzero(seg.any(axis=(1, 2)))[0][::-1]:  # only non-empty frames (as SEG writers do)
            frames.append((number, (origin[0], origin[1], origin[2] + k * spacing[2]), seg[k]))
    return frames


def test_synthetic_binary_seg_round_trip(tmp_path):
    for_uid = generate_uid()
    spacing, origin = (0.7, 0.9, 2.5), (-4.0, 7.0, 12.0)
    tumour, liver = _label_volume()
    seg = write_seg(tmp_path / "seg.dcm", _seg_frames(tumour, liver, origin, spacing), rows=13, cols=11,
                    pixel_spacing=(spacing[1], spacing[0]), for_uid=for_uid, slice_step=2.5)
    ref = ref_volume(tumour.shape, spacing, origin, for_uid=for_uid)
    np.testing.assert_array_equal(read_mask(seg, ref, roi="Tumour"), tumour)
    np.testing.assert_array_equal(read_mask(seg, ref, roi=2), liver)
    np.testing.assert_array_equal(read_mask(seg, ref), tumour | liver)
    assert list_rois(seg) == [(1, "Tumour"), (2, "Liver")]
    # on another grid (2 mm isotropic, shifted): equals SimpleITK nearest resampling of the true label
    other = ref_volume((14, 8, 8), (2.0, 2.0, 2.0), (-5.0, 6.0, 10.0), for_uid=for_uid)
    lab = sitk.GetImageFromArray(tumour.astype(np.uint8))
    lab.SetSpacing(spacing)
    lab.SetOrigin(origin)
    expected = sitk.GetArrayFromImage(sitk.Resample(lab, other.to_sitk(), sitk.Transform(),
                                                    sitk.sitkNearestNeighbor, 0)).astype(bool)
    np.testing.assert_array_equal(read_mask(seg, other, roi=1), expected)


def test_synthetic_fractional_seg_and_empty_segment(tmp_path):
    for_uid = generate_uid()
    spacing, origin = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    prob = np.zeros((4, 10, 10), np.uint8)
    prob[1, 2:8, 2:8] = 100  # below 0.5 x 255
    prob[1, 4:6, 4:6] = 200
    prob[2, 3:5, 3:5] = 255
    frames = [(1, (0.0, 0.0, float(k)), prob[k]) for k in (1, 2)]
    seg = write_seg(tmp_path / "frac.dcm", frames, rows=10, cols=10, for_uid=for_uid, seg_type="FRACTIONAL",
                    labels={1: "Lesion", 2: "Nothing"})
    ref = ref_volume(prob.shape, spacing, origin, for_uid=for_uid)
    np.testing.assert_array_equal(read_mask(seg, ref), prob >= 127.5)
    np.testing.assert_array_equal(read_seg(seg, ref, threshold=0.3)[0], prob >= 0.3 * 255)
    with pytest.raises(InputError, match="mask is empty") as exc:
        read_mask(seg, ref, roi="Nothing")
    assert all(s not in str(exc.value) for s in PHI)


def test_seg_in_a_folder_and_in_the_cache(tmp_path):
    for_uid = generate_uid()
    ct = write_ct_series(tmp_path / "ct", shape=(10, 16, 16), spacing=(1.0, 1.0, 2.0), for_uid=for_uid)
    vol = read_image(ct, modality="ct")
    tumour = np.zeros(vol.array.shape, bool)
    tumour[4:7, 5:9, 6:10] = True
    folder = tmp_path / "seg"
    folder.mkdir()
    seg = write_seg(folder / "seg.dcm", [(1, (0.0, 0.0, 2.0 * k), tumour[k]) for k in range(4, 7)],
                    rows=16, cols=16, for_uid=for_uid, labels={1: "GTV"})
    np.testing.assert_array_equal(read_mask(folder, vol), tumour)  # a folder holding only the SEG

    cache = VolumeCache(tmp_path / "cache")
    params = ImagingParams("ct", spacing=(1.0, 1.0, 1.0), size=(8, 8, 8))
    res = cache.load_preprocessed(ct, seg, params, roi="GTV")
    assert not res.cache_hit and res.roi.any()
    assert {"mask.SeriesInstanceUID", "mask.FrameOfReferenceUID", "SeriesInstanceUID"} <= set(res.uid_hashes)
    assert cache.load_preprocessed(ct, seg, params, roi="GTV").cache_hit
    assert cache.key(ct, seg, params, roi="GTV") != cache.key(ct, seg, params)
    for f in (tmp_path / "cache").rglob("*"):
        if f.is_file():
            assert all(s.encode() not in f.read_bytes() for s in PHI)

    (folder / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="point the mask to the SEG/RTSTRUCT file"):
        read_mask(folder, vol)


def test_label_image_roi_selects_a_label_value(tmp_path):
    ref = ref_volume((6, 6, 6), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), for_uid=None)
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    lab[3:5, 3:5, 3:5] = 2
    img = sitk.GetImageFromArray(lab)
    path = tmp_path / "lab.nii.gz"
    sitk.WriteImage(img, str(path))
    np.testing.assert_array_equal(read_mask(path, ref, roi=2), lab == 2)
    np.testing.assert_array_equal(read_mask(path, ref), lab > 0)
    with pytest.raises(InputError, match="labels present: 1, 2") as exc:
        read_mask(path, ref, roi=3)
    assert exc.value.field == "roi"
    with pytest.raises(InputError, match="no ROI names"):
        read_mask(path, ref, roi="GTV")
