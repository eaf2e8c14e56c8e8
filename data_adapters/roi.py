"""DICOM ROI objects: segmentations (SEG) and RT structure sets (RTSTRUCT).

Both are read *onto a reference image's voxel grid* (a :class:`Volume`), the
way :func:`data_adapters.imaging.read_mask` hands masks to preprocessing.
:func:`data_adapters.imaging.read_mask` dispatches here by content
(``Modality`` SEG or RTSTRUCT), so a manifest's ``<modality>_mask`` column
may name a SEG/RTSTRUCT file (or a folder holding only that file).

DICOM SEG (:func:`read_seg`)
----------------------------
Binary (1 bit), fractional (8 bit, thresholded at ``threshold`` x
``MaximumFractionalValue``) and label-map segmentations, single- or
multi-frame.  Each frame is placed by its per-frame
``PlanePositionSequence`` (orientation and pixel spacing from the per-frame
or shared functional groups) and its segment is read from the
``SegmentIdentificationSequence``.  Frames are stacked on the SEG's own
regular grid (SEGs usually omit empty frames: missing planes are empty), and
that grid is mapped onto the reference with nearest-neighbour resampling
through physical space (exact when the SEG was made on the reference
series).  A segment is chosen by ``SegmentNumber`` (int) or ``SegmentLabel``
(str); the default is the union of all segments.

RTSTRUCT (:func:`read_rtstruct`)
--------------------------------
``CLOSED_PLANAR`` contours of ``ROIContourSequence`` are rasterised on the
reference grid:

1. contour points (mm, patient LPS) are converted to continuous voxel
   indices with the reference geometry
   (``index = D^-1 (p - origin) / spacing``);
2. a contour must be parallel to the image slices (its index-z spread
   below half a slice) and is assigned to the plane ``z`` it lies in;
3. each image slice takes the contour plane nearest to it, within half a
   slice or half the ROI's contour-plane spacing, whichever is larger (so a
   structure contoured every 3 mm fills 1 mm CT slices, and contours drawn
   on 1 mm slices map to the nearest 3 mm PET slice without cancelling out);
4. the polygons of one plane are filled with the even-odd rule (a voxel is
   inside when its centre lies inside an odd number of polygons: a contour
   inside another is a hole), with an exact scanline fill in numpy (a voxel
   centre on an edge's left end is inside, on its right end outside, so
   abutting polygons do not overlap).

``POINT`` and ``OPEN_*`` contours are not areas and are skipped (counted in
the debug log).  An ROI is chosen by ``ROIName`` (str; exact, then
case-insensitive) or ``ROINumber`` (int); the default is the union of every
ROI that has closed contours.

Frame of reference
------------------
When the reference volume carries a hashed ``FrameOfReferenceUID`` (DICOM
input), the SEG's ``FrameOfReferenceUID`` / the RTSTRUCT ROI's
``ReferencedFrameOfReferenceUID`` must hash to the same value; otherwise the
mask belongs to another patient position/scanner session and an
:class:`InputError` names that field.  References without one (NIfTI) are
matched by geometry only.

Privacy: nothing but hashed UIDs leaves these readers; errors name the file,
the study patient ID and the field, and list segment labels / ROI names (never
patient names or dates).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk

from data_adapters.errors import InputError
from data_adapters.imaging import (
    Volume,
    _functional_item,
    _get,
    _is_hidden,
    _label_onto_reference,
    _numbers,
    _physical_bbox,
)
from data_adapters.privacy import hash_uid

__all__ = [
    "dicom_roi_kind",
    "fill_polygon",
    "list_rois",
    "read_rtstruct",
    "read_seg",
]

logger = logging.getLogger(__name__)

_ROI_MODALITIES = ("SEG", "RTSTRUCT")
_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


# --------------------------------------------------------------------------- #
# Reading and dispatch
# --------------------------------------------------------------------------- #
def _dcmread(path: Path, *, patient: str | None, header_only: bool = False) -> Any:
    """Read a DICOM file; files without the 128-byte preamble are accepted if they parse."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except pydicom.errors.InvalidDicomError:
        pass
    except Exception as exc:  # noqa: BLE001 - any parser failure means a corrupt file
        raise InputError(f"corrupt or unreadable DICOM file ({type(exc).__name__})", file=path,
                         patient=patient) from None
    try:  # e.g. pydicom's own rtstruct.dcm: a dataset without File Meta Information
        ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
    except Exception:  # noqa: BLE001
        return None
    return ds if _get(ds, "Modality") is not None and _get(ds, "SOPClassUID") is not None else None


def _modality(ds: Any) -> str:
    return str(_get(ds, "Modality") or "").strip().upper()


def dicom_roi_kind(path: str | Path, *, patient: str | None = None) -> tuple[str | None, Path | None]:
    """Whether ``path`` is a DICOM SEG or RTSTRUCT (a file, or a folder holding only that file).

    Parameters
    ----------
    path
        A mask path as given in a manifest.
    patient
        Study patient ID, only used in error messages.

    Returns
    -------
    (kind, file)
        ``("SEG", file)``, ``("RTSTRUCT", file)`` or ``(None, None)`` for
        anything else (label images, DICOM image series).
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if not _is_hidden(f.name) and f.is_file())
        for f in files:  # the first file that parses as DICOM decides (one header read for a series)
            ds = _dcmread(f, patient=patient, header_only=True)
            if ds is None:
                continue
            if _modality(ds) not in _ROI_MODALITIES:
                return None, None
            if len(files) > 1:
                raise InputError(
                    f"folder holds a DICOM {_modality(ds)} and {len(files) - 1} other file(s); "
                    "point the mask to the SEG/RTSTRUCT file itself",
                    file=p, patient=patient, field="Modality",
                )
            return _modality(ds), f
        return None, None
    if not p.is_file():
        return None, None
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")):
        return None, None
    ds = _dcmread(p, patient=patient, header_only=True)
    if ds is None or _modality(ds) not in _ROI_MODALITIES:
        return None, None
    return _modality(ds), p


def _uid_hashes(ds: Any, for_uid: str | None = None) -> dict[str, str]:
    out = {f"mask.{k}": hash_uid(str(_get(ds, k))) for k in _UID_KEYS if _get(ds, k) is not None}
    if for_uid is not None:
        out["mask.FrameOfReferenceUID"] = hash_uid(for_uid)
    return out


def _check_frame_of_reference(for_uid: str | None, reference: Volume, *, field: str, file: Path,
                              patient: str | None) -> None:
    ref_hash = reference.uid_hashes.get("FrameOfReferenceUID")
    if ref_hash is None:
        logger.debug("reference volume has no FrameOfReferenceUID: ROI matched by geometry only")
        return
    if for_uid is None:
        raise InputError(f"missing {field}: cannot check that the ROI belongs to the image's frame of reference",
                         file=file, patient=patient, field=field)
    if hash_uid(for_uid) != ref_hash:
        raise InputError(
            f"{field} differs from the image's FrameOfReferenceUID: the ROI was drawn on another "
            "acquisition (wrong mask for this image?)",
            file=file, patient=patient, field=field,
        )


# --------------------------------------------------------------------------- #
# DICOM SEG
# --------------------------------------------------------------------------- #
def _segments(ds: Any) -> list[tuple[int, str]]:
    seq = _get(ds, "SegmentSequence") or []
    return [(int(item.SegmentNumber), str(item.get("SegmentLabel", "") or "")) for item in seq]


def _describe(items: Sequence[tuple[int, str]]) -> str:
    return ", ".join(f"{n}: {label!r}" for n, label in items) or "none"


def _select_segment(segment: int | str | None, segments: list[tuple[int, str]], *, file: Path,
                    patient: str | None) -> set[int] | None:
    if segment is None:
        return None
    if isinstance(segment, (int, np.integer)) and not isinstance(segment, bool):
        if int(segment) in {n for n, _ in segments}:
            return {int(segment)}
    elif isinstance(segment, str):
        exact = {n for n, label in segments if label == segment}
        folded = {n for n, label in segments if label.casefold() == segment.strip().casefold()}
        if exact or folded:
            return exact or folded
    raise InputError(f"segment {segment!r} not found; available segments (number: label): {_describe(segments)}",
                     file=file, patient=patient, field="SegmentSequence")


def read_seg(
    path: str | Path,
    reference: Volume,
    *,
    segment: int | str | None = None,
    threshold: float = 0.5,
    patient: str | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """Read a DICOM SEG onto a reference volume's grid.

    Parameters
    ----------
    path
        The SEG file.
    reference
        The image the segmentation belongs to.
    segment
        ``SegmentNumber`` (int) or ``SegmentLabel`` (str; exact, then
        case-insensitive); None = union of all segments.
    threshold
        FRACTIONAL segmentations: a voxel is in the ROI when its value is
        >= ``threshold * MaximumFractionalValue`` (0 < threshold <= 1).
    patient
        Study patient ID, only used in error messages.

    Returns
    -------
    mask : numpy.ndarray
        bool, shape ``reference.array.shape`` (Z, Y, X).
    uid_hashes : dict
        Salted hashes ``mask.StudyInstanceUID``, ``mask.SeriesInstanceUID``,
        ``mask.FrameOfReferenceUID``.

    Raises
    ------
    InputError
        Not a SEG, missing/irregular frame geometry, another frame of
        reference (field ``FrameOfReferenceUID``), unknown segment (listing
        the available ones), empty mask, no overlap with the reference.
    """
    p = Path(path)
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    ds = _dcmread(p, patient=patient)
    if ds is None or _modality(ds) != "SEG":
        raise InputError("not a DICOM SEG (Modality SEG expected)", file=p, patient=patient, field="Modality")
    for_uid = _get(ds, "FrameOfReferenceUID")
    _check_frame_of_reference(None if for_uid is None else str(for_uid), reference, field="FrameOfReferenceUID",
                              file=p, patient=patient)
    segments = _segments(ds)
    wanted = _select_segment(segment, segments, file=p, patient=patient)
    seg_type = str(_get(ds, "SegmentationType") or "BINARY").strip().upper()
    if seg_type not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise InputError(f"SegmentationType {seg_type!r} is not supported (BINARY, FRACTIONAL, LABELMAP)",
                         file=p, patient=patient, field="SegmentationType")

    rows = int(_get(ds, "Rows") or 0)
    cols = int(_get(ds, "Columns") or 0)
    n_frames = int(_get(ds, "NumberOfFrames") or 1)
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n_frames:
        raise InputError(
            "SEG needs one PerFrameFunctionalGroupsSequence item per frame (frame positions)",
            file=p, patient=patient, field="PerFrameFunctionalGroupsSequence",
        )
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot decode SEG pixel data: {type(exc).__name__}", file=p, patient=patient,
                         field="PixelData") from None
    pixels = pixels.reshape(n_frames, rows, cols)

    if seg_type == "FRACTIONAL":
        max_value = float(_get(ds, "MaximumFractionalValue") or 255)
        frames_on = pixels >= threshold * max_value
    elif seg_type == "BINARY":
        frames_on = pixels > 0
    else:
        frames_on = None  # LABELMAP: pixel values are segment numbers

    positions, frame_segments = [], []
    orientation = spacing = None
    for i, frame in enumerate(per_frame):
        label = f"{p} (frame {i + 1})"
        pos = _functional_item(ds, frame, "PlanePositionSequence")
        ori = _functional_item(ds, frame, "PlaneOrientationSequence")
        pm = _functional_item(ds, frame, "PixelMeasuresSequence")
        for item, kw in ((pos, "PlanePositionSequence"), (ori, "PlaneOrientationSequence"),
                         (pm, "PixelMeasuresSequence")):
            if item is None:
                raise InputError(f"frame {i + 1} has no {kw}", file=p, patient=patient, field=kw)
        positions.append(_numbers(pos, "ImagePositionPatient", 3, file=label, patient=patient))
        o = _numbers(ori, "ImageOrientationPatient", 6, file=label, patient=patient)
        s = _numbers(pm, "PixelSpacing", 2, file=label, patient=patient)
        if orientation is None:
            orientation, spacing, slice_step = o, s, _get(pm, "SpacingBetweenSlices")
        elif not (np.allclose(o, orientation, atol=1e-3) and np.allclose(s, spacing, atol=1e-4)):
            raise InputError("SEG frames have different orientations or pixel spacings",
                             file=p, patient=patient, field="PlaneOrientationSequence")
        if seg_type == "LABELMAP":
            frame_segments.append(None)
        else:
            sid = _functional_item(ds, frame, "SegmentIdentificationSequence")
            if sid is None or _get(sid, "ReferencedSegmentNumber") is None:
                raise InputError(f"frame {i + 1} has no ReferencedSegmentNumber", file=p, patient=patient,
                                 field="SegmentIdentificationSequence")
            frame_segments.append(int(sid.ReferencedSegmentNumber))

    keep = [i for i, sn in enumerate(frame_segments) if sn is None or wanted is None or sn in wanted]
    row = orientation[:3] / np.linalg.norm(orientation[:3])
    col = orientation[3:] - (orientation[3:] @ row) * row
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    pos = np.asarray(positions)
    dist = pos @ normal
    in_plane = (pos - pos[0]) - np.outer(dist - dist[0], normal)
    if np.max(np.linalg.norm(in_plane, axis=1)) > 1e-2 * float(min(spacing)) + 1e-3:
        raise InputError("SEG frames do not share one in-plane origin (frames not on one grid)",
                         file=p, patient=patient, field="PlanePositionSequence")
    distinct = np.unique(np.round(dist, 4))
    if slice_step is not None and float(slice_step) > 0:
        step = float(slice_step)
    elif distinct.size > 1:
        step = float(np.min(np.diff(distinct)))
    else:
        step = float(_get(ds, "SliceThickness") or reference.spacing[2])
    k = (dist - distinct[0]) / step
    if np.max(np.abs(k - np.round(k))) > 0.01:
        raise InputError("SEG frame positions are not on a regular slice grid", file=p, patient=patient,
                         field="PlanePositionSequence")
    k = np.round(k).astype(np.int64)
    n_slices = int(k.max()) + 1
    if n_slices > 20000:
        raise InputError(f"SEG frames span {n_slices} slices: implausible geometry", file=p, patient=patient,
                         field="PlanePositionSequence")

    stack = np.zeros((n_slices, rows, cols), dtype=np.uint8)
    for i in keep:
        if frames_on is None:
            on = pixels[i] > 0 if wanted is None else np.isin(pixels[i], list(wanted))
        else:
            on = frames_on[i]
        stack[k[i]] |= on.astype(np.uint8)
    if not stack.any():
        what = "all segments" if wanted is None else f"segment {segment!r}"
        raise InputError(f"mask is empty: {what} of the SEG hold no voxel", file=p, patient=patient,
                         field="SegmentSequence")
    origin = pos[0] + (distinct[0] - dist[0]) * normal
    img = sitk.GetImageFromArray(stack)
    img.SetSpacing((float(spacing[1]), float(spacing[0]), step))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    mask = _label_onto_reference(img, reference, file=p, patient=patient)
    return mask, _uid_hashes(ds, None if for_uid is None else str(for_uid))


# --------------------------------------------------------------------------- #
# RTSTRUCT
# --------------------------------------------------------------------------- #
def fill_polygon(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise one closed polygon with the even-odd rule at pixel centres.

    Parameters
    ----------
    xy
        float (N, 2) vertices in continuous pixel index units ``(x, y)``
        (``x`` along columns, ``y`` along rows); the polygon is closed
        implicitly (a repeated first vertex is harmless).
    shape
        ``(rows, columns)`` of the output.

    Returns
    -------
    numpy.ndarray
        bool ``(rows, columns)``: True where the pixel centre ``(x, y)`` is
        inside.  Scanline rule: an edge counts for row ``y`` when
        ``min(y0, y1) <= y < max(y0, y1)``; a centre on a crossing's left end
        is inside, on its right end outside.
    """
    ny, nx = int(shape[0]), int(shape[1])
    out = np.zeros((ny, nx), dtype=bool)
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[0] < 3:
        return out
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    r_lo = max(int(np.ceil(y0.min())), 0)
    r_hi = min(int(np.floor(y0.max())), ny - 1)
    if r_hi < r_lo:
        return out
    yy = np.arange(r_lo, r_hi + 1, dtype=np.float64)[:, None]
    crosses = ((y0 <= yy) & (y1 > yy)) | ((y1 <= yy) & (y0 > yy))  # (R, M)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = x0 + (yy - y0) * (x1 - x0) / (y1 - y0)
    xc = np.where(crosses, xc, np.inf)
    xc.sort(axis=1)
    n_cross = crosses.sum(axis=1)
    width = int(n_cross.max()) if n_cross.size else 0
    if width < 2:
        return out
    xc = xc[:, :width]
    starts, ends = xc[:, 0::2], xc[:, 1::2]
    m = min(starts.shape[1], ends.shape[1])
    starts, ends = starts[:, :m], ends[:, :m]
    valid = np.isfinite(starts) & np.isfinite(ends)
    rows_idx = np.broadcast_to(np.arange(r_lo, r_hi + 1)[:, None], starts.shape)[valid]
    a = np.clip(np.ceil(starts[valid]), 0, nx).astype(np.int64)
    b = np.clip(np.ceil(ends[valid]), 0, nx).astype(np.int64)
    diff = np.zeros((ny, nx + 1), dtype=np.int32)
    np.add.at(diff, (rows_idx, a), 1)
    np.add.at(diff, (rows_idx, b), -1)
    return np.cumsum(diff[:, :nx], axis=1) > 0


def list_rois(path: str | Path, *, patient: str | None = None) -> list[tuple[int, str]]:
    """``(number, name)`` of the ROIs of an RTSTRUCT or the segments of a SEG."""
    p = Path(path)
    ds = _dcmread(p, patient=patient, header_only=True)
    mod = "" if ds is None else _modality(ds)
    if mod == "SEG":
        return _segments(ds)
    if mod == "RTSTRUCT":
        return [(int(r.ROINumber), str(r.get("ROIName", "") or "")) for r in _get(ds, "StructureSetROISequence") or []]
    raise InputError("not a DICOM SEG or RTSTRUCT", file=p, patient=patient, field="Modality")


def _select_rois(roi: int | str | None, rois: list[tuple[int, str]], *, file: Path,
                 patient: str | None) -> set[int] | None:
    if roi is None:
        return None
    if isinstance(roi, (int, np.integer)) and not isinstance(roi, bool):
        if int(roi) in {n for n, _ in rois}:
            return {int(roi)}
    elif isinstance(roi, str):
        exact = {n for n, name in rois if name == roi}
        folded = {n for n, name in rois if name.strip().casefold() == roi.strip().casefold()}
        if exact or folded:
            return exact or folded
    names = ", ".join(repr(name) for _, name in rois) or "none"
    raise InputError(f"ROI {roi!r} not found; available ROI names: {names}", file=file, patient=patient,
                     field="ROIName")


def read_rtstruct(
    path: str | Path,
    reference: Volume,
    *,
    roi: int | str | None = None,
    patient: str | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """Rasterise RTSTRUCT contours onto a reference volume's grid.

    Parameters
    ----------
    path
        The RTSTRUCT file.
    reference
        The image the structures were drawn on (its geometry maps mm to voxels).
    roi
        ``ROIName`` (str; exact, then case-insensitive) or ``ROINumber``
        (int); None = union of all ROIs with closed planar contours.
    patient
        Study patient ID, only used in error messages.

    Returns
    -------
    mask : numpy.ndarray
        bool, shape ``reference.array.shape`` (Z, Y, X).
    uid_hashes : dict
        Salted hashes ``mask.StudyInstanceUID``, ``mask.SeriesInstanceUID``,
        ``mask.FrameOfReferenceUID``.

    Raises
    ------
    InputError
        Not an RTSTRUCT, unknown ROI (listing the available names), an ROI
        on another frame of reference (field ``ReferencedFrameOfReferenceUID``),
        contours not parallel to the slices, contours outside the image
        ("does not overlap"), an empty result.
    """
    p = Path(path)
    ds = _dcmread(p, patient=patient)
    if ds is None or _modality(ds) != "RTSTRUCT":
        raise InputError("not a DICOM RTSTRUCT (Modality RTSTRUCT expected)", file=p, patient=patient,
                         field="Modality")
    ss_rois = {int(r.ROINumber): r for r in _get(ds, "StructureSetROISequence") or []}
    rois = [(n, str(r.get("ROIName", "") or "")) for n, r in ss_rois.items()]
    wanted = _select_rois(roi, rois, file=p, patient=patient)
    contours_by_roi = {int(rc.ReferencedROINumber): list(_get(rc, "ContourSequence") or [])
                       for rc in _get(ds, "ROIContourSequence") or []}

    shape = reference.array.shape  # (Z, Y, X)
    d = reference.direction_matrix
    d_inv = np.linalg.inv(d)
    origin = np.asarray(reference.origin)
    spacing = np.asarray(reference.spacing)
    mask = np.zeros(shape, dtype=bool)
    used_for: set[str] = set()
    n_closed = n_skipped = n_outside = 0
    all_points = []
    for number in sorted(ss_rois if wanted is None else wanted):
        for_uid = _get(ss_rois[number], "ReferencedFrameOfReferenceUID")
        planes: dict[float, list[np.ndarray]] = {}
        for contour in contours_by_roi.get(number, []):
            kind = str(_get(contour, "ContourGeometricType") or "").strip().upper()
            data = _get(contour, "ContourData")
            if kind != "CLOSED_PLANAR" or data is None:
                n_skipped += 1
                continue
            pts = np.asarray([float(v) for v in data], dtype=np.float64)
            if pts.size < 9 or pts.size % 3:
                raise InputError(f"ContourData of ROI {number} holds {pts.size} numbers, expected 3 per point "
                                 "and at least 3 points", file=p, patient=patient, field="ContourData")
            pts = pts.reshape(-1, 3)
            all_points.append(pts)
            idx = ((pts - origin) @ d_inv.T) / spacing  # (N, 3) continuous (x, y, z)
            z = idx[:, 2]
            if np.ptp(z) > 0.5:
                raise InputError(
                    f"a contour of ROI {number} spans {np.ptp(z):.2f} slices: contours must be parallel "
                    "to the image slices (structure set drawn on an image with another orientation?)",
                    file=p, patient=patient, field="ContourData")
            planes.setdefault(round(float(z.mean()), 3), []).append(idx[:, :2])
            n_closed += 1
        if not planes:
            if wanted is not None:
                raise InputError(f"ROI {roi!r} has no closed planar contours (points or open contours only)",
                                 file=p, patient=patient, field="ContourGeometricType")
            continue
        if for_uid is not None:
            used_for.add(str(for_uid))
        _check_frame_of_reference(None if for_uid is None else str(for_uid), reference,
                                  field="ReferencedFrameOfReferenceUID", file=p, patient=patient)
        zs = np.array(sorted(planes))
        tol = 0.5 if zs.size < 2 else max(0.5, 0.5 * float(np.median(np.diff(zs))))
        filled = {}
        for k in range(shape[0]):
            j = int(np.argmin(np.abs(zs - k)))
            if abs(zs[j] - k) > tol + 1e-6:
                continue
            if j not in filled:
                plane = np.zeros(shape[1:], dtype=bool)
                for poly in planes[float(zs[j])]:
                    plane ^= fill_polygon(poly, shape[1:])
                filled[j] = plane
            mask[k] |= filled[j]
        n_outside += int(np.sum((zs < -tol) | (zs > shape[0] - 1 + tol)))
    logger.debug("RTSTRUCT: %d closed contours rasterised, %d point/open contours skipped, %d planes outside",
                 n_closed, n_skipped, n_outside)
    if n_closed == 0:
        raise InputError("mask is empty: the RTSTRUCT has no closed planar contours", file=p, patient=patient,
                         field="ContourGeometricType")
    if not mask.any():
        pts = np.concatenate(all_points)
        m_lo, m_hi = pts.min(axis=0), pts.max(axis=0)
        r_lo, r_hi = _physical_bbox(shape[::-1], reference.spacing, reference.origin, reference.direction)
        if np.all(m_hi >= r_lo) and np.all(r_hi >= m_lo):
            msg = "mask is empty: the contours enclose no voxel centre of the image grid"
        else:
            msg = ("mask does not overlap the image in physical space (contours span "
                   f"{np.round(m_lo, 1).tolist()}..{np.round(m_hi, 1).tolist()} mm, image spans "
                   f"{np.round(r_lo, 1).tolist()}..{np.round(r_hi, 1).tolist()} mm); wrong mask or image?")
        raise InputError(msg, file=p, patient=patient)
    for_uid = next(iter(used_for)) if len(used_for) == 1 else None
    return mask, _uid_hashes(ds, for_uid)
