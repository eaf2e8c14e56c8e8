"""Medical volumes: DICOM / NIfTI / NRRD / MHA in, physically normalised arrays out.

This module turns imaging inputs into fixed-size, physically normalised arrays
for the encoders, and caches the result so that later epochs never decode
DICOM again.

Reading
-------
:func:`read_dicom_series` reads one DICOM series (a folder of single-frame
files, or one enhanced multi-frame file) with pydicom into a :class:`Volume`
whose geometry follows SimpleITK's conventions (spacing/origin/direction in
(x, y, z), array in numpy (z, y, x) order).  Slices are ordered by their
``ImagePositionPatient`` projected on the slice normal (never by
``InstanceNumber``) and the stack is checked: one series, one orientation,
no duplicate positions, uniform slice spacing (a gap is reported), positions
along the normal (no gantry tilt).  Intensities are made physical: CT in HU
(``RescaleSlope``/``RescaleIntercept`` per slice), PET in SUVbw
(:func:`suv_bw_factor`), MR left in arbitrary units.

:func:`read_image` dispatches a folder (or a ``.dcm`` file) to the DICOM
reader and ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` files to
SimpleITK.  :func:`read_mask` puts an ROI on a reference volume's grid: DICOM
SEG and RTSTRUCT (dispatched by content to :mod:`data_adapters.roi`) or a
label image resampled with nearest neighbour through physical space.

Uncompressed little-endian pixel data are decoded with one ``np.frombuffer``
per slice and rescaled in float32 in place (pydicom's generic pixel pipeline
is kept for everything else), so reading a 512 x 512 series is as fast as
SimpleITK/GDCM (``benchmarks/imaging.py``).

Preprocessing
-------------
:func:`preprocess` resamples once onto a target grid (spacing, size) centred
on the ROI centroid and normalises by physics: CT windowed to [0, 1], PET
SUV compressed (``log1p`` or clipped), MR z-scored with the statistics of the
volume's own Otsu foreground (a per-volume transform, nothing is fitted
across patients, so there is no cross-fold leakage).

Caching
-------
:class:`VolumeCache` keys the preprocessed arrays by the SHA-256 of the input
files' bytes, the parameters and :data:`PREPROCESS_VERSION`.  A hit only
hashes file bytes: no pydicom or SimpleITK reader is called; within one
process a file's digest is memoised on its (inode, size, mtime, ctime), so
from the second epoch on a hit costs one ``stat`` per file and an ``.npz``
read.

Privacy
-------
No DICOM PHI (PatientName, PatientID, PatientBirthDate, addresses, dates and
times) is logged, stored in a :class:`Volume` or a cache file, or put in an
error message.  The only identifiers kept are salted hashes of the Study,
Series and FrameOfReference UIDs (:func:`data_adapters.privacy.hash_uid`).

Hidden files (names starting with ``.``, e.g. ``.DS_Store``) in a DICOM folder
are ignored; every other entry must be a DICOM image of the same series
(sub-folders, DICOMDIR files and non-DICOM files are errors naming the entry).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk

from data_adapters.errors import InputError
from data_adapters.privacy import hash_uid

__all__ = [
    "PREPROCESS_VERSION",
    "ImagingParams",
    "PreprocessedVolume",
    "Volume",
    "VolumeCache",
    "preprocess",
    "read_dicom_series",
    "read_image",
    "read_mask",
    "suv_bw_factor",
]

logger = logging.getLogger(__name__)

#: Bumped whenever reading or preprocessing changes its output, so that stale
#: cache entries are never reused.
PREPROCESS_VERSION = "radfusion-imaging-2"  # 2: float32 rescale, separable numpy resampling

#: File suffixes read with SimpleITK.
SITK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Single-file DICOM suffixes accepted by :func:`read_image` (enhanced multi-frame).
DICOM_FILE_SUFFIXES = (".dcm", ".dicom", ".ima")

_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
_MODALITY_ALIASES = {
    "ct": "CT",
    "pt": "PT",
    "pet": "PT",
    "mr": "MR",
    "mri": "MR",
    "ot": "OT",
}
_DEFAULT_UNITS = {"CT": "HU", "PT": "SUVbw", "MR": "a.u.", "OT": "a.u."}
_PARAM_TO_MODALITY = {"ct": "CT", "pet": "PT", "mri": "MR"}

# Geometry tolerances.
_ORIENTATION_TOL = 1e-3  # on direction cosines
_SPACING_REL_TOL = 0.01  # 1 % of the slice spacing ...
_SPACING_ABS_TOL = 0.01  # ... or 0.01 mm, whichever is larger
_DUPLICATE_TOL = 1e-3  # mm


# --------------------------------------------------------------------------- #
# Volume
# --------------------------------------------------------------------------- #
@dataclass
class Volume:
    """A 3-D image with its physical geometry, in SimpleITK conventions.

    Attributes
    ----------
    array
        float32, shape (Z, Y, X) (numpy order, as ``sitk.GetArrayFromImage``).
    spacing
        Voxel size (x, y, z) in mm.
    origin
        Physical position (x, y, z) in mm (LPS) of the centre of voxel (0, 0, 0).
    direction
        Nine direction cosines, row-major 3x3 matrix whose columns are the
        physical directions of the x, y and z index axes.
    modality
        ``"CT"``, ``"PT"``, ``"MR"`` or ``"OT"``.
    units
        ``"HU"``, ``"SUVbw"`` or ``"a.u."``.
    uid_hashes
        Salted hashes of StudyInstanceUID, SeriesInstanceUID and
        FrameOfReferenceUID (keys present only when the input had them).
    source
        The path read.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    modality: str = "OT"
    units: str = "a.u."
    uid_hashes: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise ValueError(f"array: expected 3 dimensions (z, y, x), got shape {arr.shape}")
        self.array = np.ascontiguousarray(arr, dtype=np.float32)
        self.spacing = _tuple_of(self.spacing, 3, "spacing")
        self.origin = _tuple_of(self.origin, 3, "origin")
        self.direction = _tuple_of(self.direction, 9, "direction")
        if any(not (s > 0) for s in self.spacing):
            raise ValueError(f"spacing: expected positive values, got {self.spacing}")

    def __repr__(self) -> str:
        return (
            f"Volume(shape={tuple(self.array.shape)}, dtype={self.array.dtype}, "
            f"spacing={self.spacing}, origin={self.origin}, direction={self.direction}, "
            f"modality={self.modality!r}, units={self.units!r}, "
            f"uid_hashes={self.uid_hashes!r}, source={self.source!r})"
        )

    @property
    def direction_matrix(self) -> np.ndarray:
        """The direction as a (3, 3) float64 matrix (columns = index axes)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        """Map continuous indices (N, 3) in (x, y, z) order to physical points (N, 3)."""
        idx = np.atleast_2d(np.asarray(index_xyz, dtype=np.float64))
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ self.direction_matrix.T

    def to_sitk(self) -> sitk.Image:
        """Return a float32 SimpleITK image with this volume's geometry."""
        img = sitk.GetImageFromArray(self.array)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(
        cls,
        img: sitk.Image,
        *,
        modality: str = "OT",
        units: str = "a.u.",
        uid_hashes: dict[str, str] | None = None,
        source: str = "",
    ) -> Volume:
        """Build a volume from a 3-D scalar SimpleITK image (values cast to float32)."""
        if img.GetDimension() != 3:
            raise ValueError(f"img: expected a 3-D image, got {img.GetDimension()}-D")
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"img: expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components"
            )
        return cls(
            array=sitk.GetArrayFromImage(img).astype(np.float32, copy=False),
            spacing=img.GetSpacing(),
            origin=img.GetOrigin(),
            direction=img.GetDirection(),
            modality=modality,
            units=units,
            uid_hashes=dict(uid_hashes or {}),
            source=str(source),
        )


def _tuple_of(values: Sequence[float], n: int, name: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != n:
        raise ValueError(f"{name}: expected {n} numbers, got {len(out)}")
    return out


def _normalise_modality(modality: str | None, *, file: Any, patient: str | None) -> str | None:
    if modality is None:
        return None
    key = str(modality).strip().lower()
    if key not in _MODALITY_ALIASES:
        raise InputError(
            f"unknown modality {modality!r}; expected one of ct, pet, mri (or CT, PT, MR, OT)",
            file=file,
            patient=patient,
            field="modality",
        )
    return _MODALITY_ALIASES[key]


# --------------------------------------------------------------------------- #
# DICOM helpers
# --------------------------------------------------------------------------- #
def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _list_dicom_file_names(folder: Path, *, patient: str | None) -> list[str]:
    """Paths (str) of the files of a DICOM series folder, sorted by name; hidden files ignored."""
    if not folder.exists():
        raise InputError("folder does not exist", file=folder, patient=patient)
    if not folder.is_dir():
        raise InputError("expected a folder of DICOM files", file=folder, patient=patient)
    files: list[str] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _is_hidden(entry.name):
            continue
        if entry.is_dir():
            raise InputError(
                "a DICOM series folder must hold only the series' files, found a sub-folder; "
                "point to the folder of one series",
                file=entry.path,
                patient=patient,
            )
        if not entry.is_file():
            raise InputError("not a regular file", file=entry.path, patient=patient)
        files.append(entry.path)
    if not files:
        raise InputError("folder holds no DICOM files", file=folder, patient=patient)
    return files


def _list_dicom_files(folder: Path, *, patient: str | None) -> list[Path]:
    """Files of a DICOM series folder, sorted by name; hidden files ignored."""
    return [Path(f) for f in _list_dicom_file_names(folder, patient=patient)]


def _get(ds: Any, keyword: str) -> Any:
    """Value of ``keyword`` or None when absent or empty."""
    value = ds.get(keyword, None) if ds is not None else None
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        # never str() binary values: PixelData is megabytes (and the repr was the reader's hot spot)
        return value if len(value) else None
    if isinstance(value, str) and not value.strip():
        return None
    try:
        if len(value) == 0 and not isinstance(value, (int, float)):
            return None
    except TypeError:
        pass
    return value


def _number(
    ds: Any, keyword: str, *, file: Any, patient: str | None, required: bool = True
) -> float | None:
    value = _get(ds, keyword)
    if value is None:
        if required:
            raise InputError(f"missing or empty {keyword}", file=file, patient=patient, field=keyword)
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{keyword} is not a number", file=file, patient=patient, field=keyword) from None
    if not math.isfinite(out):
        raise InputError(f"{keyword} is not finite", file=file, patient=patient, field=keyword)
    return out


def _numbers(ds: Any, keyword: str, n: int, *, file: Any, patient: str | None) -> np.ndarray:
    value = _get(ds, keyword)
    if value is None:
        raise InputError(f"missing or empty {keyword}", file=file, patient=patient, field=keyword)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{keyword} is not a list of numbers", file=file, patient=patient, field=keyword) from None
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InputError(
            f"{keyword} must hold {n} finite numbers, got {out.size}", file=file, patient=patient, field=keyword
        )
    return out


def _parse_tm(value: Any, *, file: Any, patient: str | None, field: str) -> float:
    """DICOM TM (``HHMMSS.FFFFFF``, parts optional, ACR-NEMA colons tolerated) -> seconds."""
    text = str(value).strip().replace(":", "")
    try:
        main, _, frac = text.partition(".")
        if len(main) < 2 or not main.isdigit():
            raise ValueError
        hours = int(main[0:2])
        minutes = int(main[2:4]) if len(main) >= 4 else 0
        seconds = int(main[4:6]) if len(main) >= 6 else 0
        fraction = float("0." + frac) if frac else 0.0
    except ValueError:
        raise InputError(
            f"{field} is not a valid DICOM time (expected HHMMSS.FFFFFF)", file=file, patient=patient, field=field
        ) from None
    if hours > 23 or minutes > 59 or seconds > 60:
        raise InputError(f"{field} is out of range", file=file, patient=patient, field=field)
    return hours * 3600.0 + minutes * 60.0 + seconds + fraction


def _parse_da(value: Any, *, file: Any, patient: str | None, field: str) -> _dt.date:
    text = str(value).strip().replace(".", "")
    try:
        return _dt.date(int(text[0:4]), int(text[4:6]), int(text[6:8]))
    except (ValueError, IndexError):
        raise InputError(
            f"{field} is not a valid DICOM date (expected YYYYMMDD)", file=file, patient=patient, field=field
        ) from None


def _parse_dt(value: Any, *, file: Any, patient: str | None, field: str) -> tuple[_dt.date | None, float]:
    """DICOM DT -> (date or None, seconds since midnight).  A UTC offset is ignored."""
    text = str(value).strip()
    for sign in ("+", "-"):
        if sign in text[8:]:
            text = text[: 8 + text[8:].index(sign)]
    if len(text) < 8 or not text[:8].isdigit():
        raise InputError(
            f"{field} is not a valid DICOM date-time (expected YYYYMMDDHHMMSS.FFFFFF)",
            file=file,
            patient=patient,
            field=field,
        )
    day = _parse_da(text[:8], file=file, patient=patient, field=field)
    rest = text[8:]
    seconds = _parse_tm(rest, file=file, patient=patient, field=field) if rest else 0.0
    return day, seconds


def suv_bw_factor(ds: pydicom.Dataset, *, file: str | Path | None = None, patient: str | None = None) -> float:
    """Factor that converts PET activity concentration (Bq/ml) to body-weight SUV.

    ``SUVbw = activity * factor`` with
    ``factor = weight_g / (dose_Bq * 2 ** (-(t_ref - t_inj) / half_life_s))``:
    the injected dose is decay-corrected to the time the image activity
    refers to (Kinahan & Fletcher, "PET/CT standardized uptake values (SUVs)
    in clinical practice and assessing response to therapy", Semin Ultrasound
    CT MR 2010; QIBA FDG-PET/CT profile SUV computation).

    Conventions
    -----------
    * ``Units`` must be ``BQML``.
    * ``DecayCorrection == "START"``: images are decay-corrected to the series
      start, so ``t_ref`` is ``SeriesDate``/``SeriesTime`` (``AcquisitionTime``
      when ``SeriesTime`` is absent).  Vendors that rewrite ``SeriesTime`` in
      post-processing are not detected.
    * ``DecayCorrection == "ADMIN"``: images are already corrected to the
      injection time, so no decay factor is applied.
    * Any other value (``NONE``) or a missing ``DecayCorrection`` is an error:
      frame-wise decay would need per-frame timing we do not model.
    * Injection time: ``RadiopharmaceuticalStartDateTime`` when present
      (with its date), else ``RadiopharmaceuticalStartTime`` on the scan day.
      A scan before the injection is an error (e.g. a scan after midnight
      with only times recorded: provide ``RadiopharmaceuticalStartDateTime``).

    Parameters
    ----------
    ds
        A PET image dataset (one slice, or an enhanced PET file).
    file, patient
        Only used to locate errors.

    Returns
    -------
    float
        Multiply Bq/ml by this value to get SUVbw (g/ml).

    Raises
    ------
    InputError
        Naming the missing or invalid DICOM keyword.  Tag values that could
        identify the patient (weight, dates, times) are never echoed.
    """
    units = _get(ds, "Units")
    if units is None:
        raise InputError("missing Units; PET must be in BQML", file=file, patient=patient, field="Units")
    if str(units).strip().upper() != "BQML":
        raise InputError(
            f"PET Units is {str(units).strip()!r}, expected 'BQML' (activity concentration) to compute SUVbw",
            file=file,
            patient=patient,
            field="Units",
        )
    weight_kg = _number(ds, "PatientWeight", file=file, patient=patient)
    if weight_kg is None or weight_kg <= 0:
        raise InputError("PatientWeight must be > 0 kg", file=file, patient=patient, field="PatientWeight")
    seq = _get(ds, "RadiopharmaceuticalInformationSequence")
    if seq is None:
        raise InputError(
            "missing RadiopharmaceuticalInformationSequence (injected dose and time)",
            file=file,
            patient=patient,
            field="RadiopharmaceuticalInformationSequence",
        )
    item = seq[0]
    dose = _number(item, "RadionuclideTotalDose", file=file, patient=patient)
    if dose is None or dose <= 0:
        raise InputError(
            "RadionuclideTotalDose must be > 0 Bq", file=file, patient=patient, field="RadionuclideTotalDose"
        )
    half_life = _number(item, "RadionuclideHalfLife", file=file, patient=patient)
    if half_life is None or half_life <= 0:
        raise InputError(
            "RadionuclideHalfLife must be > 0 s", file=file, patient=patient, field="RadionuclideHalfLife"
        )
    decay = _get(ds, "DecayCorrection")
    if decay is None:
        raise InputError(
            "missing DecayCorrection; expected START or ADMIN", file=file, patient=patient, field="DecayCorrection"
        )
    decay = str(decay).strip().upper()
    weight_g = weight_kg * 1000.0
    if decay == "ADMIN":
        return weight_g / dose
    if decay != "START":
        raise InputError(
            f"DecayCorrection is {decay!r}; only START and ADMIN are supported",
            file=file,
            patient=patient,
            field="DecayCorrection",
        )
    # reference (scan start) time
    if _get(ds, "SeriesTime") is not None:
        scan_s = _parse_tm(ds.SeriesTime, file=file, patient=patient, field="SeriesTime")
        scan_date_kw = "SeriesDate"
    elif _get(ds, "AcquisitionTime") is not None:
        scan_s = _parse_tm(ds.AcquisitionTime, file=file, patient=patient, field="AcquisitionTime")
        scan_date_kw = "AcquisitionDate"
    else:
        raise InputError(
            "missing SeriesTime (and AcquisitionTime): the scan start is needed to decay-correct the dose",
            file=file,
            patient=patient,
            field="SeriesTime",
        )
    scan_day = None
    for kw in (scan_date_kw, "SeriesDate", "AcquisitionDate", "StudyDate"):
        if _get(ds, kw) is not None:
            scan_day = _parse_da(ds.get(kw), file=file, patient=patient, field=kw)
            break
    # injection time
    inj_day: _dt.date | None = None
    if _get(item, "RadiopharmaceuticalStartDateTime") is not None:
        inj_day, inj_s = _parse_dt(
            item.RadiopharmaceuticalStartDateTime,
            file=file,
            patient=patient,
            field="RadiopharmaceuticalStartDateTime",
        )
        inj_field = "RadiopharmaceuticalStartDateTime"
    elif _get(item, "RadiopharmaceuticalStartTime") is not None:
        inj_s = _parse_tm(
            item.RadiopharmaceuticalStartTime, file=file, patient=patient, field="RadiopharmaceuticalStartTime"
        )
        inj_field = "RadiopharmaceuticalStartTime"
    else:
        raise InputError(
            "missing RadiopharmaceuticalStartTime (and RadiopharmaceuticalStartDateTime)",
            file=file,
            patient=patient,
            field="RadiopharmaceuticalStartTime",
        )
    elapsed = scan_s - inj_s
    if inj_day is not None and scan_day is not None:
        elapsed += (scan_day - inj_day).days * 86400.0
    if elapsed < 0:
        raise InputError(
            "the scan starts before the injection; check the injection date/time",
            file=file,
            patient=patient,
            field=inj_field,
        )
    decayed_dose = dose * 2.0 ** (-elapsed / half_life)
    return weight_g / decayed_dose


@dataclass
class _Slice:
    """One 2-D plane of a series (a single-frame file or a frame of a multi-frame file)."""

    label: str  # file (and frame) for error messages
    position: np.ndarray  # (3,)
    orientation: np.ndarray  # (6,)
    pixel_spacing: np.ndarray  # (2,) (row spacing, column spacing)
    rows: int
    columns: int
    slope: float | None
    intercept: float | None
    pixels: Callable[[], np.ndarray]  # -> (rows, columns) stored values
    ds: Any  # the dataset holding the slice (for PET SUV tags)


def _read_dataset(path: Path, *, patient: str | None) -> Any:
    try:
        return pydicom.dcmread(path, force=False)
    except pydicom.errors.InvalidDicomError:
        raise InputError(
            "not a DICOM file (no DICM prefix); every non-hidden file in a series folder must be DICOM",
            file=path,
            patient=patient,
        ) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure means a corrupt file
        raise InputError(
            f"corrupt or unreadable DICOM file ({type(exc).__name__})", file=path, patient=patient
        ) from None


_NATIVE_LITTLE_ENDIAN = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
}


def _decode_native(ds: Any) -> np.ndarray | None:
    """Stored values of uncompressed little-endian integer pixel data, or None (use pydicom).

    A fast path for the common case (CT/PET/MR slices, 8/16/32-bit integers,
    one sample per pixel): one ``np.frombuffer`` instead of pydicom's generic
    pixel pipeline.  Like pydicom, values with ``BitsStored < BitsAllocated``
    are masked (unsigned) or sign-extended (signed).  Anything else
    (compressed, big endian, float, colour, 1-bit, odd HighBit) returns None.
    """
    try:
        ts = str(ds.file_meta.TransferSyntaxUID)
    except AttributeError:
        return None
    if ts not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds:
        return None
    try:
        bits = int(ds.BitsAllocated)
        stored = int(ds.get("BitsStored", bits))
        high = int(ds.get("HighBit", stored - 1))
        signed = int(ds.PixelRepresentation) == 1
        spp = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        count = int(ds.Rows) * int(ds.Columns) * frames
    except (AttributeError, TypeError, ValueError):
        return None
    if bits not in (8, 16, 32) or spp != 1 or high != stored - 1 or not 0 < stored <= bits:
        return None
    raw = ds.PixelData
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < count * dtype.itemsize:
        return None
    arr = np.frombuffer(raw, dtype=dtype, count=count)
    if stored < bits:
        if signed:
            shift = bits - stored
            arr = (arr << shift) >> shift
        else:
            arr = arr & dtype.type((1 << stored) - 1)
    shape = (frames, int(ds.Rows), int(ds.Columns)) if frames > 1 else (int(ds.Rows), int(ds.Columns))
    return arr.reshape(shape)


def _decode_pixels(ds: Any, path: Path, *, patient: str | None) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError("DICOM file has no pixel data", file=path, patient=patient, field="PixelData")
    fast = _decode_native(ds)
    if fast is not None:
        return fast
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts))
        raise InputError(
            f"cannot decode pixel data (transfer syntax {ts_name}): {type(exc).__name__}: {exc}",
            file=path,
            patient=patient,
            field="PixelData",
        ) from None
    return np.asarray(arr)


def _reject_non_image_modality(ds: Any, path: Path, *, patient: str | None) -> None:
    modality = str(_get(ds, "Modality") or "").strip().upper()
    if modality in {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG"}:
        raise InputError(
            f"DICOM {modality} objects are not image series read by this reader "
            "(DICOM SEG and RTSTRUCT are ROIs: pass them as masks, read by read_mask)",
            file=path,
            patient=patient,
            field="Modality",
        )


def _check_image_basics(ds: Any, path: Path, *, patient: str | None) -> tuple[int, int]:
    rows = _number(ds, "Rows", file=path, patient=patient)
    cols = _number(ds, "Columns", file=path, patient=patient)
    spp = _get(ds, "SamplesPerPixel")
    if spp is not None and int(spp) != 1:
        raise InputError(
            f"expected a grey-level image (SamplesPerPixel 1), got {int(spp)}",
            file=path,
            patient=patient,
            field="SamplesPerPixel",
        )
    return int(rows), int(cols)


def _rescale_from(item: Any) -> tuple[float | None, float | None]:
    slope = _get(item, "RescaleSlope")
    intercept = _get(item, "RescaleIntercept")
    return (None if slope is None else float(slope)), (None if intercept is None else float(intercept))


def _slices_from_single_frame(ds: Any, path: Path, *, patient: str | None) -> list[_Slice]:
    rows, cols = _check_image_basics(ds, path, patient=patient)
    position = _numbers(ds, "ImagePositionPatient", 3, file=path, patient=patient)
    orientation = _numbers(ds, "ImageOrientationPatient", 6, file=path, patient=patient)
    spacing = _numbers(ds, "PixelSpacing", 2, file=path, patient=patient)
    slope, intercept = _rescale_from(ds)

    def pixels() -> np.ndarray:
        arr = _decode_pixels(ds, path, patient=patient)
        if arr.shape != (rows, cols):
            raise InputError(
                f"pixel data has shape {arr.shape}, expected (Rows, Columns) = ({rows}, {cols})",
                file=path,
                patient=patient,
                field="PixelData",
            )
        return arr

    return [_Slice(str(path), position, orientation, spacing, rows, cols, slope, intercept, pixels, ds)]


def _functional_item(ds: Any, per_frame: Any, keyword: str) -> Any:
    """First item of a functional group sequence: per-frame first, then shared."""
    for group in (per_frame, _shared_group(ds)):
        if group is None:
            continue
        seq = _get(group, keyword)
        if seq is not None:
            return seq[0]
    return None


def _shared_group(ds: Any) -> Any:
    seq = _get(ds, "SharedFunctionalGroupsSequence")
    return None if seq is None else seq[0]


def _slices_from_multi_frame(ds: Any, path: Path, *, patient: str | None) -> list[_Slice]:
    """Frames of an enhanced (functional-group) multi-frame image."""
    rows, cols = _check_image_basics(ds, path, patient=patient)
    n_frames = int(_number(ds, "NumberOfFrames", file=path, patient=patient) or 1)
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        raise InputError(
            "multi-frame DICOM without PerFrameFunctionalGroupsSequence: frame positions unknown "
            "(only enhanced CT/MR/PET multi-frame files are supported)",
            file=path,
            patient=patient,
            field="PerFrameFunctionalGroupsSequence",
        )
    if len(per_frame) != n_frames:
        raise InputError(
            f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for NumberOfFrames {n_frames}",
            file=path,
            patient=patient,
            field="PerFrameFunctionalGroupsSequence",
        )
    cache: dict[str, np.ndarray] = {}

    def all_frames() -> np.ndarray:
        if "frames" not in cache:
            arr = _decode_pixels(ds, path, patient=patient)
            if arr.size != n_frames * rows * cols:
                raise InputError(
                    f"pixel data has shape {arr.shape}, expected {n_frames} frames of ({rows}, {cols})",
                    file=path,
                    patient=patient,
                    field="PixelData",
                )
            cache["frames"] = arr.reshape(n_frames, rows, cols)
        return cache["frames"]

    top_slope, top_intercept = _rescale_from(ds)
    slices = []
    for i, frame in enumerate(per_frame):
        label = f"{path} (frame {i + 1})"
        pos_item = _functional_item(ds, frame, "PlanePositionSequence")
        ori_item = _functional_item(ds, frame, "PlaneOrientationSequence")
        pm_item = _functional_item(ds, frame, "PixelMeasuresSequence")
        if pos_item is None:
            raise InputError(f"frame {i + 1} has no PlanePositionSequence", file=path, patient=patient,
                             field="PlanePositionSequence")
        if ori_item is None:
            raise InputError(f"frame {i + 1} has no PlaneOrientationSequence", file=path, patient=patient,
                             field="PlaneOrientationSequence")
        if pm_item is None:
            raise InputError(f"frame {i + 1} has no PixelMeasuresSequence", file=path, patient=patient,
                             field="PixelMeasuresSequence")
        position = _numbers(pos_item, "ImagePositionPatient", 3, file=label, patient=patient)
        orientation = _numbers(ori_item, "ImageOrientationPatient", 6, file=label, patient=patient)
        spacing = _numbers(pm_item, "PixelSpacing", 2, file=label, patient=patient)
        pvt = _functional_item(ds, frame, "PixelValueTransformationSequence")
        slope, intercept = _rescale_from(pvt) if pvt is not None else (None, None)
        if slope is None and intercept is None:
            slope, intercept = top_slope, top_intercept
        slices.append(
            _Slice(label, position, orientation, spacing, rows, cols, slope, intercept,
                   (lambda i=i: all_frames()[i]), ds)
        )
    return slices


def _check_same(values: list[np.ndarray], labels: list[str], tol: float, *, field: str, what: str,
                folder: Path, patient: str | None) -> None:
    ref = values[0]
    if np.all(np.abs(np.asarray(values, dtype=np.float64) - ref) <= tol):  # the common case, vectorised
        return
    distinct = [ref]
    for v in values[1:]:
        if not any(np.allclose(v, d, atol=tol, rtol=0) for d in distinct):
            distinct.append(v)
    if len(distinct) > 1:
        bad = next(lab for v, lab in zip(values, labels) if not np.allclose(v, ref, atol=tol, rtol=0))
        raise InputError(
            f"slices have {len(distinct)} different {what}s (e.g. {Path(bad.split(' (frame')[0]).name} "
            f"differs from {Path(labels[0].split(' (frame')[0]).name}); expected one {what} per series",
            file=folder,
            patient=patient,
            field=field,
        )


def _geometry(slices: list[_Slice], *, folder: Path, patient: str | None) -> tuple[list[_Slice], dict[str, Any]]:
    """Sort slices along the normal and check the stack; return geometry in SimpleITK order."""
    labels = [s.label for s in slices]
    _check_same([s.orientation for s in slices], labels, _ORIENTATION_TOL,
                field="ImageOrientationPatient", what="orientation", folder=folder, patient=patient)
    _check_same([np.array([s.rows, s.columns], float) for s in slices], labels, 0.5,
                field="Rows", what="image size (Rows, Columns)", folder=folder, patient=patient)
    _check_same([s.pixel_spacing for s in slices], labels, 1e-4,
                field="PixelSpacing", what="pixel spacing", folder=folder, patient=patient)
    row = slices[0].orientation[:3]
    col = slices[0].orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise InputError(
            "ImageOrientationPatient does not hold two orthogonal unit vectors",
            file=folder, patient=patient, field="ImageOrientationPatient",
        )
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)

    dist = np.array([s.position @ normal for s in slices])
    order = np.argsort(dist, kind="stable")
    slices = [slices[i] for i in order]
    dist = dist[order]

    z_spacing: float
    if len(slices) > 1:
        diffs = np.diff(dist)
        dup = np.flatnonzero(diffs < _DUPLICATE_TOL)
        if dup.size:
            i = int(dup[0])
            raise InputError(
                "duplicate slice positions: "
                f"{Path(slices[i].label).name} and {Path(slices[i + 1].label).name} are both at "
                f"{dist[i]:.3f} mm along the slice normal (duplicate files, several stacks or time points?)",
                file=folder, patient=patient, field="ImagePositionPatient",
            )
        expected = float(np.median(diffs))
        tol = max(_SPACING_ABS_TOL, _SPACING_REL_TOL * expected)
        bad = np.flatnonzero(np.abs(diffs - expected) > tol)
        if bad.size:
            i = int(bad[0])
            raise InputError(
                f"slice positions are not uniformly spaced: gap of {diffs[i]:.3f} mm between positions "
                f"{dist[i]:.3f} and {dist[i + 1]:.3f} mm along the slice normal, expected spacing "
                f"{expected:.3f} mm (missing slice?); {bad.size} irregular gap(s) in {len(slices)} slices",
                file=folder, patient=patient, field="ImagePositionPatient",
            )
        # positions must advance along the normal only (no gantry tilt / shear)
        offsets = np.array([s.position - slices[0].position for s in slices])
        in_plane = offsets - np.outer(offsets @ normal, normal)
        worst = float(np.max(np.linalg.norm(in_plane, axis=1)))
        if worst > max(_SPACING_ABS_TOL, _SPACING_REL_TOL * expected) * 10:
            raise InputError(
                f"slice positions drift {worst:.3f} mm in-plane: the stack is sheared "
                "(gantry tilt?), which a regular grid cannot represent",
                file=folder, patient=patient, field="ImagePositionPatient",
            )
        z_spacing = float((dist[-1] - dist[0]) / (len(slices) - 1))
    else:
        ds = slices[0].ds
        z = _get(ds, "SpacingBetweenSlices") or _get(ds, "SliceThickness")
        z_spacing = float(z) if z is not None and float(z) > 0 else 1.0

    direction = np.column_stack([row, col, normal])
    ps = slices[0].pixel_spacing
    geometry = {
        "spacing": (float(ps[1]), float(ps[0]), z_spacing),
        "origin": tuple(float(v) for v in slices[0].position),
        "direction": tuple(float(v) for v in direction.ravel()),
    }
    return slices, geometry


def _read_dicom_files(
    files: list[Path],
    *,
    where: Path,
    modality: str | None,
    require_hu: bool,
    patient: str | None,
) -> Volume:
    datasets = [(p, _read_dataset(p, patient=patient)) for p in files]

    by_series: dict[str, list[tuple[Path, Any]]] = {}
    for path, ds in datasets:
        _reject_non_image_modality(ds, path, patient=patient)
        if _get(ds, "PixelData") is None and _get(ds, "FloatPixelData") is None:
            sop = getattr(_get(ds, "SOPClassUID"), "name", "unknown SOP class")
            raise InputError(
                f"DICOM file has no pixel data: not an image ({sop}) or a truncated/corrupt file", file=path, patient=patient, field="PixelData"
            )
        uid = _get(ds, "SeriesInstanceUID")
        if uid is None:
            raise InputError("missing SeriesInstanceUID", file=path, patient=patient, field="SeriesInstanceUID")
        by_series.setdefault(str(uid), []).append((path, ds))
    if len(by_series) > 1:
        sizes = sorted((len(v) for v in by_series.values()), reverse=True)
        raise InputError(
            f"found {len(by_series)} DICOM series (files per series: {sizes}); expected exactly one series "
            "per folder",
            file=where, patient=patient, field="SeriesInstanceUID",
        )

    first_path, first = datasets[0]
    dicom_modality = str(_get(first, "Modality") or "").strip().upper()
    mod = dicom_modality if dicom_modality in {"CT", "PT", "MR"} else "OT"
    if modality is not None:
        if dicom_modality and mod != modality:
            raise InputError(
                f"DICOM Modality is {dicom_modality!r}, expected {modality!r}",
                file=where, patient=patient, field="Modality",
            )
        mod = modality

    multi = [(p, ds) for p, ds in datasets if int(_get(ds, "NumberOfFrames") or 1) > 1
             or _get(ds, "PerFrameFunctionalGroupsSequence") is not None]
    if multi and len(datasets) > 1:
        raise InputError(
            f"a multi-frame file ({multi[0][0].name}) is mixed with {len(datasets) - 1} other file(s); "
            "an enhanced multi-frame series must be one file",
            file=where, patient=patient, field="NumberOfFrames",
        )
    if multi:
        slices = _slices_from_multi_frame(first, first_path, patient=patient)
    else:
        slices = [s for p, ds in datasets for s in _slices_from_single_frame(ds, p, patient=patient)]

    slices, geometry = _geometry(slices, folder=where, patient=patient)

    units = _DEFAULT_UNITS[mod]
    rescale_ok = True
    for s in slices:
        if s.intercept is None or s.slope is None:
            if mod in {"CT", "PT"} and (require_hu or mod == "PT"):
                missing = "RescaleIntercept" if s.intercept is None else "RescaleSlope"
                raise InputError(
                    f"missing {missing}: stored values cannot be converted to "
                    f"{'HU' if mod == 'CT' else 'Bq/ml'}",
                    file=s.label, patient=patient, field=missing,
                )
            rescale_ok = False
    if mod == "CT" and not rescale_ok:
        units = "a.u."
        logger.warning("CT series without rescale tags read as raw stored values (require_hu=False)")

    factors: dict[int, float] = {}
    out = np.empty((len(slices), slices[0].rows, slices[0].columns), dtype=np.float32)
    for k, s in enumerate(slices):
        # one fused float32 pass per slice: out = stored * (slope * suv_factor) + intercept * suv_factor
        scale = 1.0 if s.slope is None else s.slope
        offset = 0.0 if s.intercept is None else s.intercept
        if mod == "PT":
            key = id(s.ds)
            if key not in factors:
                factors[key] = suv_bw_factor(s.ds, file=s.label.split(" (frame")[0], patient=patient)
            scale *= factors[key]
            offset *= factors[key]
        plane = out[k]
        plane[...] = s.pixels()
        if scale != 1.0:
            plane *= np.float32(scale)
        if offset != 0.0:
            plane += np.float32(offset)
    if mod == "PT" and len(set(np.round(list(factors.values()), 9))) > 1:
        raise InputError(
            "slices give different SUV factors (dose, weight or timing tags differ within the series)",
            file=where, patient=patient, field="RadiopharmaceuticalInformationSequence",
        )

    uid_hashes = {k: hash_uid(str(_get(first, k))) for k in _UID_KEYS if _get(first, k) is not None}
    logger.debug("read DICOM series: %d slices, modality %s", len(slices), mod)
    return Volume(
        array=out,
        spacing=geometry["spacing"],
        origin=geometry["origin"],
        direction=geometry["direction"],
        modality=mod,
        units=units,
        uid_hashes=uid_hashes,
        source=str(where),
    )


def read_dicom_series(
    folder: str | Path,
    *,
    modality: str | None = None,
    require_hu: bool = True,
    patient: str | None = None,
) -> Volume:
    """Read one DICOM series into a physically correct :class:`Volume`.

    Parameters
    ----------
    folder
        A folder holding the files of exactly one series (hidden files such
        as ``.DS_Store`` are ignored; anything else must be a DICOM image of
        that series), or a single enhanced multi-frame DICOM file.
    modality
        Expected modality (``"ct"``, ``"pet"``, ``"mri"`` or ``CT``/``PT``/``MR``);
        an InputError is raised if the DICOM ``Modality`` differs.  ``None``
        takes the DICOM value (anything but CT/PT/MR becomes ``"OT"``).
    require_hu
        CT without ``RescaleSlope``/``RescaleIntercept`` is an error when True;
        when False the raw stored values are returned with units ``"a.u."``.
    patient
        Study patient ID, only used in error messages.

    Returns
    -------
    Volume
        ``array`` float32 (Z, Y, X) with slices ordered along the normal
        ``row_cosine x column_cosine``; spacing ``(PixelSpacing[1],
        PixelSpacing[0], slice spacing)``; origin = first slice's
        ``ImagePositionPatient``; direction columns ``[row, column, normal]``.
        CT in HU, PET in SUVbw (see :func:`suv_bw_factor`), MR in a.u.

    Raises
    ------
    InputError
        Non-DICOM or corrupt files, several series, mixed orientations or
        image sizes, duplicate positions, a gap (missing slice), sheared
        stacks, missing geometry/rescale/PET tags.
    """
    path = Path(folder)
    mod = _normalise_modality(modality, file=path, patient=patient)
    if path.is_file():
        files = [path]
    else:
        files = _list_dicom_files(path, patient=patient)
    return _read_dicom_files(files, where=path, modality=mod, require_hu=require_hu, patient=patient)


# --------------------------------------------------------------------------- #
# SimpleITK formats
# --------------------------------------------------------------------------- #
def _sitk_suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SITK_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def _read_sitk(path: Path, *, patient: str | None, what: str = "image") -> sitk.Image:
    if not path.is_file():
        raise InputError(f"{what} file does not exist", file=path, patient=patient)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
        raise InputError(f"cannot read {what} with SimpleITK: {first_line}", file=path, patient=patient) from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"expected a scalar {what}, got {img.GetNumberOfComponentsPerPixel()} components per voxel",
            file=path, patient=patient,
        )
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    elif dim != 3:
        raise InputError(f"expected a 3-D {what}, got {dim}-D with size {img.GetSize()}", file=path, patient=patient)
    return img


def read_image(path: str | Path, *, modality: str | None = None, patient: str | None = None) -> Volume:
    """Read a volume from a DICOM folder/file or a NIfTI/NRRD/MetaImage file.

    Parameters
    ----------
    path
        A DICOM series folder, a single (enhanced multi-frame) ``.dcm`` file,
        or a ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` file.
    modality
        ``"ct"``, ``"pet"``, ``"mri"`` (or CT/PT/MR/OT).  For DICOM it is checked
        against the header; for other formats it sets ``Volume.modality`` and
        the units the file is assumed to be in: CT ``"HU"``, PET ``"SUVbw"``
        (non-DICOM PET must already be in SUVbw: there is no header to convert
        from), MR and OT ``"a.u."``.
    patient
        Study patient ID, only used in error messages.

    Returns
    -------
    Volume
    """
    p = Path(path)
    mod = _normalise_modality(modality, file=p, patient=patient)
    if p.is_dir():
        return read_dicom_series(p, modality=mod, patient=patient)
    if not p.exists():
        raise InputError("image path does not exist", file=p, patient=patient)
    if p.name.lower().endswith(DICOM_FILE_SUFFIXES):
        return read_dicom_series(p, modality=mod, patient=patient)
    if _sitk_suffix(p) is None:
        raise InputError(
            f"unsupported image format; expected a DICOM folder or one of {', '.join(SITK_SUFFIXES + DICOM_FILE_SUFFIXES)}",
            file=p, patient=patient,
        )
    img = _read_sitk(p, patient=patient)
    mod = mod or "OT"
    return Volume.from_sitk(img, modality=mod, units=_DEFAULT_UNITS[mod], source=str(p))


# --------------------------------------------------------------------------- #
# Masks
# --------------------------------------------------------------------------- #
def _grid_of(volume: Volume) -> dict[str, Any]:
    z, y, x = volume.array.shape
    return {"size": (x, y, z), "spacing": volume.spacing, "origin": volume.origin, "direction": volume.direction}


def _same_grid(img: sitk.Image, grid: dict[str, Any]) -> bool:
    return (
        tuple(img.GetSize()) == tuple(grid["size"])
        and np.allclose(img.GetSpacing(), grid["spacing"], atol=1e-4)
        and np.allclose(img.GetOrigin(), grid["origin"], atol=1e-3)
        and np.allclose(img.GetDirection(), grid["direction"], atol=1e-5)
    )


def _physical_bbox(size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                   direction: Sequence[float], lo: Sequence[float] | None = None,
                   hi: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box of the voxel extents (index lo..hi, half a voxel out)."""
    lo = np.zeros(3) if lo is None else np.asarray(lo, float)
    hi = np.asarray(size, float) - 1 if hi is None else np.asarray(hi, float)
    corners = np.array([[a, b, c] for a in (lo[0] - .5, hi[0] + .5) for b in (lo[1] - .5, hi[1] + .5)
                        for c in (lo[2] - .5, hi[2] + .5)])
    d = np.asarray(direction, float).reshape(3, 3)
    pts = np.asarray(origin) + (corners * np.asarray(spacing)) @ d.T
    return pts.min(axis=0), pts.max(axis=0)


def _resample_nearest(img: sitk.Image, grid: dict[str, Any]) -> sitk.Image:
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in grid["size"]])
    f.SetOutputSpacing([float(v) for v in grid["spacing"]])
    f.SetOutputOrigin([float(v) for v in grid["origin"]])
    f.SetOutputDirection([float(v) for v in grid["direction"]])
    f.SetTransform(sitk.Transform())
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(0)
    f.SetOutputPixelType(sitk.sitkUInt8)
    return f.Execute(img)


def _label_onto_reference(label: sitk.Image, reference: Volume, *, file: Any,
                          patient: str | None = None) -> np.ndarray:
    """A binary uint8 label image (values 0/1) on ``reference``'s grid, as bool (Z, Y, X).

    Taken as is when it already shares the reference grid, else resampled
    with nearest neighbour through physical space.  Raises InputError for an
    empty label, a label that does not overlap the reference and an ROI that
    vanishes on the reference grid.
    """
    label_arr = sitk.GetArrayViewFromImage(label)
    nz = np.argwhere(label_arr)
    if nz.size == 0:
        raise InputError("mask is empty (no voxel > 0); expected an ROI label image", file=file, patient=patient)
    grid = _grid_of(reference)
    if _same_grid(label, grid):
        return label_arr.astype(bool)
    out = sitk.GetArrayFromImage(_resample_nearest(label, grid)).astype(bool)
    if not out.any():
        m_lo, m_hi = _physical_bbox(label.GetSize(), label.GetSpacing(), label.GetOrigin(), label.GetDirection(),
                                    nz.min(axis=0)[::-1], nz.max(axis=0)[::-1])
        r_lo, r_hi = _physical_bbox(grid["size"], grid["spacing"], grid["origin"], grid["direction"])
        if np.all(m_hi >= r_lo) and np.all(r_hi >= m_lo):
            msg = ("mask ROI vanishes on the image grid (it is smaller than one image voxel or falls "
                   "between voxel centres)")
        else:
            msg = ("mask does not overlap the image in physical space (ROI spans "
                   f"{np.round(m_lo, 1).tolist()}..{np.round(m_hi, 1).tolist()} mm, image spans "
                   f"{np.round(r_lo, 1).tolist()}..{np.round(r_hi, 1).tolist()} mm); wrong mask or image?")
        raise InputError(msg, file=file, patient=patient)
    return out


def _binarise_label(img: sitk.Image, roi: int | str | None, *, file: Any, patient: str | None) -> sitk.Image:
    """``img > 0`` (any label), or ``img == roi`` for an integer label value."""
    if roi is None:
        return sitk.Cast(img > 0, sitk.sitkUInt8)
    if isinstance(roi, bool) or not isinstance(roi, (int, np.integer)):
        raise InputError(f"a label image has no ROI names; select a label by its integer value, got {roi!r}",
                         file=file, patient=patient, field="roi")
    out = sitk.Cast(img == float(roi), sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(out).any():
        values = np.unique(sitk.GetArrayViewFromImage(img))
        shown = ", ".join(str(v.item()) for v in values[values != 0][:20])
        raise InputError(f"label value {roi} not found in the mask; labels present: {shown or 'none'}",
                         file=file, patient=patient, field="roi")
    return out


def _read_mask_with_uids(
    path: str | Path, reference: Volume, *, roi: int | str | None = None, patient: str | None = None
) -> tuple[np.ndarray, dict[str, str]]:
    from data_adapters import roi as _roi  # local import: roi builds on this module

    p = Path(path)
    kind, roi_file = _roi.dicom_roi_kind(p, patient=patient)
    if kind == "SEG":
        return _roi.read_seg(roi_file, reference, segment=roi, patient=patient)
    if kind == "RTSTRUCT":
        return _roi.read_rtstruct(roi_file, reference, roi=roi, patient=patient)
    if p.is_dir() or p.name.lower().endswith(DICOM_FILE_SUFFIXES):
        vol = read_dicom_series(p, require_hu=False, patient=patient)
        label = _binarise_label(vol.to_sitk(), roi, file=p, patient=patient)
        uids = {f"mask.{k}": v for k, v in vol.uid_hashes.items()}
    else:
        if _sitk_suffix(p) is None:
            raise InputError(
                "unsupported mask format; expected a DICOM SEG or RTSTRUCT file, a DICOM folder or one of "
                f"{', '.join(SITK_SUFFIXES)}",
                file=p, patient=patient,
            )
        img = _read_sitk(p, patient=patient, what="mask")
        label = _binarise_label(img, roi, file=p, patient=patient)
        uids = {}
    return _label_onto_reference(label, reference, file=p, patient=patient), uids


def read_mask(path: str | Path, reference: Volume, *, roi: int | str | None = None,
              patient: str | None = None) -> np.ndarray:
    """Read an ROI onto a reference volume's voxel grid.

    Dispatches on the content, not the suffix:

    * DICOM SEG (a file, or a folder holding only that file): frames placed
      by their ``PlanePositionSequence`` (:func:`data_adapters.roi.read_seg`);
      ``roi`` is a segment number or ``SegmentLabel``; default the union of
      all segments.
    * DICOM RTSTRUCT: closed planar contours rasterised on the reference grid
      (:func:`data_adapters.roi.read_rtstruct`); ``roi`` is an ``ROIName`` (or
      ``ROINumber``); default the union of all ROIs with closed contours.
    * Label images (NIfTI/NRRD/MetaImage file, or a DICOM series of labels):
      binarised (label > 0 is the ROI, or label == ``roi`` when an integer is
      given) and, unless it already shares the reference grid, resampled
      with nearest-neighbour interpolation through physical space
      (SimpleITK ``ResampleImageFilter``, identity transform).

    Parameters
    ----------
    path
        The mask file or folder.
    reference
        The image the mask belongs to.
    roi
        Which ROI to take (see above); None = all.
    patient
        Study patient ID, only used in error messages.

    Returns
    -------
    numpy.ndarray
        bool, shape ``reference.array.shape`` (Z, Y, X).

    Raises
    ------
    InputError
        Unreadable file, empty mask, a mask that does not overlap the image,
        a SEG/RTSTRUCT on another FrameOfReferenceUID (naming the field), an
        unknown segment/ROI (listing the available ones).
    """
    arr, _ = _read_mask_with_uids(path, reference, roi=roi, patient=patient)
    return arr


# --------------------------------------------------------------------------- #
# Preprocessing
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ImagingParams:
    """How a volume is resampled and normalised for one modality.

    Parameters
    ----------
    modality
        ``"ct"``, ``"pet"`` or ``"mri"``.
    spacing
        Target voxel size (x, y, z) in mm.
    size
        Target grid size (x, y, z) in voxels; output arrays are (z, y, x).
    ct_window
        HU window (low, high); HU are clipped to it then scaled to [0, 1].
    pet_compression
        ``"log"``: ``log1p(SUV)``; ``"clip"``: ``clip(SUV, 0, pet_clip) / pet_clip``.
        Negative SUVs (reconstruction noise) are set to 0 first in both cases.
    pet_clip
        SUV upper bound for ``"clip"`` (a tumour-to-background ratio bound with
        ``pet_reference="body_median"``).
    pet_reference
        ``"none"``: keep SUVbw.  ``"body_median"``: divide the SUV by the median
        SUV of the patient's body, i.e. the voxels of the *whole* PET volume at
        or above :data:`PET_BODY_SUV` (air and out-of-field padding read ~0;
        any tissue in an FDG scan reads more), computed before resampling.  The
        image then holds a tumour-to-background ratio: a global normalisation
        like the reference-region SUV ratios of PERCIST (liver) or brain PET
        (whole brain, cerebellum).  It cancels global calibration errors of the
        scanner, dose assay and weight (a per-site SUV signature) at the price
        of absolute SUV.
    mri_foreground_threshold
        ``"otsu"``: z-score with the mean/std of the voxels above the volume's
        Otsu threshold; ``"none"``: with the mean/std of all voxels.
    """

    modality: str
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    size: tuple[int, int, int] = (24, 24, 24)
    ct_window: tuple[float, float] = (-200.0, 300.0)
    pet_compression: str = "log"
    pet_clip: float = 20.0
    mri_foreground_threshold: str = "otsu"
    pet_reference: str = "none"

    def __post_init__(self) -> None:
        if self.modality not in _PARAM_TO_MODALITY:
            raise InputError(f"expected one of {sorted(_PARAM_TO_MODALITY)}, got {self.modality!r}",
                             field="modality")
        spacing = tuple(float(v) for v in self.spacing)
        if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
            raise InputError(f"expected 3 positive numbers (x, y, z) mm, got {self.spacing!r}", field="spacing")
        try:
            size = tuple(int(v) for v in self.size)
        except (TypeError, ValueError):
            raise InputError(f"expected 3 positive integers (x, y, z), got {self.size!r}", field="size") from None
        if len(size) != 3 or any(v < 1 for v in size) or any(int(v) != v for v in self.size):
            raise InputError(f"expected 3 positive integers (x, y, z), got {self.size!r}", field="size")
        window = tuple(float(v) for v in self.ct_window)
        if len(window) != 2 or not window[0] < window[1]:
            raise InputError(f"expected (low, high) with low < high, got {self.ct_window!r}", field="ct_window")
        if self.pet_compression not in ("log", "clip"):
            raise InputError(f"expected 'log' or 'clip', got {self.pet_compression!r}", field="pet_compression")
        if not (math.isfinite(float(self.pet_clip)) and float(self.pet_clip) > 0):
            raise InputError(f"expected a positive SUV, got {self.pet_clip!r}", field="pet_clip")
        if self.mri_foreground_threshold not in ("otsu", "none"):
            raise InputError(f"expected 'otsu' or 'none', got {self.mri_foreground_threshold!r}",
                             field="mri_foreground_threshold")
        if self.pet_reference not in PET_REFERENCES:
            raise InputError(f"expected one of {list(PET_REFERENCES)}, got {self.pet_reference!r}",
                             field="pet_reference")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "ct_window", window)
        object.__setattr__(self, "pet_clip", float(self.pet_clip))

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) used in cache keys.

        ``pet_reference`` is left out at its default (``"none"``), so cache
        entries written before the option existed keep their keys.
        """
        d = dataclasses.asdict(self)
        if d["pet_reference"] == "none":
            del d["pet_reference"]
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


#: ``ImagingParams.pet_reference`` choices.
PET_REFERENCES = ("none", "body_median")
#: SUV at or above which a PET voxel counts as body for ``pet_reference="body_median"``.
PET_BODY_SUV = 0.3


def _pet_reference_suv(volume: Volume, *, patient: str | None) -> float:
    """Median SUV of the body voxels (>= :data:`PET_BODY_SUV`) of the whole PET volume."""
    arr = volume.array
    body = arr[arr >= PET_BODY_SUV]
    if body.size < 10:
        raise InputError(f"PET has {body.size} voxels at SUV >= {PET_BODY_SUV}: no body to normalise to "
                         "(empty or mis-scaled PET?)", file=volume.source or None, patient=patient,
                         field="pet_reference")
    return float(np.median(body))


def _mri_stats(volume: Volume, method: str, *, patient: str | None) -> tuple[float, float]:
    arr = volume.array
    if method == "otsu":
        f = sitk.OtsuThresholdImageFilter()
        f.SetInsideValue(0)
        f.SetOutsideValue(1)
        f.Execute(volume.to_sitk())
        fg = arr[arr > f.GetThreshold()]
    else:
        fg = arr.ravel()
    if fg.size < 2:
        raise InputError("MR foreground is empty (constant image?)", file=volume.source or None, patient=patient,
                         field="mri_foreground_threshold")
    mean = float(fg.mean(dtype=np.float64))
    std = float(fg.std(dtype=np.float64))
    if not std > 0:
        raise InputError("MR foreground has zero variance: cannot z-score", file=volume.source or None,
                         patient=patient, field="mri_foreground_threshold")
    return mean, std


def _crop_for_grid(volume: Volume, out_origin: np.ndarray, out_spacing: np.ndarray, out_size: np.ndarray,
                   margin: int = 2) -> tuple[slice, slice, slice]:
    """(z, y, x) slices of ``volume.array`` covering a target grid with the volume's direction.

    The target grid's corners are mapped to continuous input indices; the
    bounding box grows by ``margin`` voxels (so every linear-interpolation
    neighbour is kept) and is clipped to the volume.  A grid entirely
    outside the volume keeps one voxel (the resampler then only writes the
    default value).
    """
    shape_xyz = np.asarray(volume.array.shape[::-1])
    corners = np.array([[a, b, c] for a in (0, out_size[0] - 1) for b in (0, out_size[1] - 1)
                        for c in (0, out_size[2] - 1)], dtype=np.float64)
    d = volume.direction_matrix
    phys = np.asarray(out_origin) + (corners * out_spacing) @ d.T
    idx = np.linalg.solve(d, (phys - np.asarray(volume.origin)).T).T / np.asarray(volume.spacing)
    lo = np.maximum(np.floor(idx.min(axis=0)).astype(np.int64) - margin, 0)
    hi = np.minimum(np.ceil(idx.max(axis=0)).astype(np.int64) + margin, shape_xyz - 1)
    if np.any(hi < lo):
        lo = np.zeros(3, np.int64)
        hi = np.zeros(3, np.int64)
    return tuple(slice(int(lo[i]), int(hi[i]) + 1) for i in (2, 1, 0))  # type: ignore[return-value]


def _axis_maps(volume: Volume, out_origin: np.ndarray, out_spacing: np.ndarray, out_size: np.ndarray,
               crop: tuple[slice, slice, slice]) -> list[tuple[float, float, int, float, float]]:
    """Per array axis (z, y, x): ``(offset, step, n_out, lo, hi)``.

    Input index = ``offset + step * output index``, measured from the crop's
    first voxel (valid because the output grid has the input's direction:
    ``i_in = S_in^-1 D^-1 (o_out - o_in) + (s_out / s_in) i_out``); a point is
    inside the *whole* volume when ``lo <= index < hi``.
    """
    d = volume.direction_matrix
    shift = np.linalg.solve(d, np.asarray(out_origin, float) - np.asarray(volume.origin)) / np.asarray(volume.spacing)
    step = np.asarray(out_spacing, float) / np.asarray(volume.spacing)
    out = []
    shape_zyx = volume.array.shape
    for axis_xyz in (2, 1, 0):
        start = crop[2 - axis_xyz].start
        n_full = shape_zyx[2 - axis_xyz]
        out.append((float(shift[axis_xyz] - start), float(step[axis_xyz]), int(out_size[axis_xyz]),
                    -0.5 - start, n_full - 0.5 - start))
    return out


def _resample_separable(arr: np.ndarray, axes: list[tuple[float, float, int, float, float]], default: Any, *,
                        nearest: bool) -> np.ndarray:
    """Resample a (Z, Y, X) array on an axis-aligned grid, one axis at a time.

    Trilinear interpolation is the tensor product of 1-D linear
    interpolations, so three 1-D passes give exactly SimpleITK's
    ``ResampleImageFilter`` with ``sitkLinear`` (up to float rounding) and,
    with ``nearest``, ``sitkNearestNeighbor``: a point is inside when its
    continuous index lies in ``[-0.5, n - 0.5)`` along every axis (else
    ``default``); neighbours beyond the edge are clamped; nearest rounds
    half up.  ``arr`` may be a crop of the volume: neighbours are clamped to
    the crop (which keeps a margin), the inside test uses the whole volume's
    bounds.  The most shrinking axis goes first, so later passes work on less
    data.
    """
    order = sorted(range(3), key=lambda a: axes[a][2] / max(arr.shape[a], 1))
    out = arr
    valid = []
    for axis in order:
        offset, step, n_out, lo, hi = axes[axis]
        n_in = arr.shape[axis]
        c = offset + step * np.arange(n_out, dtype=np.float64)
        inside = (c >= lo) & (c < hi)
        valid.append((axis, inside))
        shape = [1, 1, 1]
        shape[axis] = n_out
        if nearest:
            out = np.take(out, np.clip(np.floor(c + 0.5), 0, n_in - 1).astype(np.intp), axis=axis)
            continue
        f = np.floor(c)
        w = (c - f).astype(np.float32).reshape(shape)
        a0 = np.take(out, np.clip(f, 0, n_in - 1).astype(np.intp), axis=axis)
        a1 = np.take(out, np.clip(f + 1, 0, n_in - 1).astype(np.intp), axis=axis)
        a1 -= a0
        a1 *= w
        a0 += a1
        out = a0
    if not all(m.all() for _, m in valid):
        keep = np.ones((1, 1, 1), dtype=bool)
        for axis, m in valid:
            shape = [1, 1, 1]
            shape[axis] = m.size
            keep = keep & m.reshape(shape)
        out = np.where(keep, out, np.asarray(default, dtype=out.dtype))
    return np.ascontiguousarray(out)


def preprocess(
    volume: Volume, mask: np.ndarray | None, params: ImagingParams, *, patient: str | None = None,
    return_grid: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict]:
    """Resample a volume onto a fixed grid around the ROI and normalise it by physics.

    The target grid has ``params.spacing`` and ``params.size`` (x, y, z), the
    input volume's direction (so its axes stay aligned with the scan axes) and
    its centre on the physical centroid of ``mask`` (or the volume's centre
    when ``mask`` is None).  The image is resampled once with linear
    interpolation and the mask with nearest neighbour.  Because the grid
    shares the input's direction this is separable: three 1-D passes in
    numpy over the cropped region the grid samples, equal to SimpleITK
    ``ResampleImageFilter`` (``sitkLinear`` / ``sitkNearestNeighbor``,
    identity transform) up to float rounding, without copying the scan.
    Outside the input field of view the image takes a physically empty
    value: -1000 HU (CT), 0 SUV (PET), the volume minimum (MR).

    Normalisation (per volume, nothing is fitted across patients):

    * CT (HU): clipped to ``ct_window`` and scaled to [0, 1].
    * PET (SUVbw): negatives set to 0, optionally divided by the body's
      median SUV (``pet_reference``), then ``log1p`` or clip/``pet_clip``.
    * MR: ``(x - mean) / std`` with mean and std of the foreground voxels of
      the whole input volume, computed before resampling (Otsu threshold via
      ``sitk.OtsuThresholdImageFilter``).  Background is *not* set to 0 after
      scoring: 0 is the mean foreground intensity, so zeroing would make air
      look like average tissue; background keeps its (negative) z-score and
      the out-of-view padding is the z-score of the volume minimum.

    Parameters
    ----------
    volume
        The input volume.  CT must be in HU and PET in SUVbw.
    mask
        bool (Z, Y, X) on ``volume``'s grid, or None.
    params
        Target grid and normalisation.
    patient
        Study patient ID, only used in error messages.
    return_grid
        Also return the target grid's geometry.

    Returns
    -------
    image : numpy.ndarray
        float32, shape (1, size_z, size_y, size_x).
    roi : numpy.ndarray
        bool, shape (size_z, size_y, size_x); all False without a mask.
    grid : dict
        Only with ``return_grid``: ``spacing``, ``origin`` (mm) and
        ``direction`` (row-major 3x3) of the output grid in SimpleITK's
        (x, y, z) / LPS convention, so an array on this grid (a Grad-CAM map)
        can be written as an image that overlays the original scan.
    """
    if not isinstance(params, ImagingParams):
        raise TypeError(f"params: expected ImagingParams, got {type(params).__name__}")
    src = volume.source or None
    expected_mod = _PARAM_TO_MODALITY[params.modality]
    if volume.modality not in (expected_mod, "OT"):
        raise InputError(f"volume modality is {volume.modality!r}, params are for {params.modality!r}",
                         file=src, patient=patient, field="modality")
    if params.modality == "ct" and volume.units != "HU":
        raise InputError(f"CT preprocessing needs HU, volume units are {volume.units!r} "
                         "(read it with modality='ct' and rescale tags)", file=src, patient=patient, field="units")
    if params.modality == "pet" and volume.units != "SUVbw":
        raise InputError(f"PET preprocessing needs SUVbw, volume units are {volume.units!r} "
                         "(read it with modality='pet')", file=src, patient=patient, field="units")

    shape = volume.array.shape
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise InputError(f"mask shape {mask.shape} differs from the volume shape {shape}",
                             file=src, patient=patient, field="mask")
        mask = mask.astype(bool, copy=False)
        idx = np.argwhere(mask)
        if idx.size == 0:
            raise InputError("mask is empty", file=src, patient=patient, field="mask")
        centre_index = idx.mean(axis=0)[::-1]  # (x, y, z)
    else:
        centre_index = (np.asarray(shape[::-1], dtype=np.float64) - 1.0) / 2.0
    centre = volume.index_to_physical(centre_index)[0]

    out_spacing = np.asarray(params.spacing, dtype=np.float64)
    out_size = np.asarray(params.size, dtype=np.int64)
    d = volume.direction_matrix
    out_origin = centre - d @ (out_spacing * (out_size - 1) / 2.0)

    if params.modality == "ct":
        default = -1000.0
    elif params.modality == "pet":
        default = 0.0
        reference = _pet_reference_suv(volume, patient=patient) if params.pet_reference == "body_median" else 1.0
    else:
        default = float(volume.array.min())
        mean, std = _mri_stats(volume, params.mri_foreground_threshold, patient=patient)

    # The target grid shares the input's direction, so resampling is separable along the index
    # axes; only the crop of the input the grid samples is touched (views, no copy of the scan).
    crop = _crop_for_grid(volume, out_origin, out_spacing, out_size)
    axes = _axis_maps(volume, out_origin, out_spacing, out_size, crop)
    image = _resample_separable(volume.array[crop], axes, default, nearest=False)
    if params.modality == "ct":
        lo, hi = params.ct_window
        np.clip(image, lo, hi, out=image)
        image -= np.float32(lo)
        image /= np.float32(hi - lo)
    elif params.modality == "pet":
        np.maximum(image, 0.0, out=image)
        if reference != 1.0:
            image /= np.float32(reference)
        if params.pet_compression == "log":
            np.log1p(image, out=image)
        else:
            np.minimum(image, params.pet_clip, out=image)
            image /= np.float32(params.pet_clip)
    else:
        image = (image - mean) / std
    image = np.ascontiguousarray(image, dtype=np.float32)[None]

    if mask is not None:
        roi = _resample_separable(mask[crop], axes, False, nearest=True)
    else:
        roi = np.zeros(tuple(int(v) for v in out_size[::-1]), dtype=bool)
    if return_grid:
        grid = {"spacing": [float(v) for v in out_spacing], "origin": [float(v) for v in out_origin],
                "direction": [float(v) for v in np.asarray(d, dtype=np.float64).ravel()]}
        return image, roi, grid
    return image, roi


# --------------------------------------------------------------------------- #
# Cache
# --------------------------------------------------------------------------- #
@dataclass
class PreprocessedVolume:
    """Arrays ready for an encoder.

    Attributes
    ----------
    image
        float32 (1, D, H, W).
    roi
        bool (D, H, W).
    uid_hashes
        Salted UID hashes of the image (and ``mask.*`` of a DICOM mask).
    cache_hit
        True when read from the cache without decoding any image.
    grid
        Geometry of the arrays' grid in the scan's physical space
        (``spacing``, ``origin``, ``direction``; see :func:`preprocess`).
    """

    image: np.ndarray
    roi: np.ndarray
    uid_hashes: dict[str, str]
    cache_hit: bool
    grid: dict | None = None

    def __repr__(self) -> str:
        return (f"PreprocessedVolume(image={tuple(self.image.shape)}, roi={tuple(self.roi.shape)}, "
                f"uid_hashes={self.uid_hashes!r}, cache_hit={self.cache_hit})")


def _companion_data_file(path: Path) -> Path | None:
    """The detached data file of a ``.mhd`` or ``.nhdr`` header, if any."""
    name = path.name.lower()
    if not (name.endswith(".mhd") or name.endswith(".nhdr")):
        return None
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=" if name.endswith(".mhd") else ":")
        key = key.strip().lower()
        if sep and key in ("elementdatafile", "data file", "datafile"):
            value = value.strip()
            if value and value.upper() not in ("LOCAL", "LIST") and "%" not in value:
                return path.parent / value
    return None


def _input_files(path: Path, *, patient: str | None) -> list[Path] | list[str]:
    if path.is_dir():
        return _list_dicom_file_names(path, patient=patient)
    if not path.is_file():
        raise InputError("input path does not exist", file=path, patient=patient)
    files = [path]
    extra = _companion_data_file(path)
    if extra is not None and extra.is_file():
        files.append(extra)
    return files


#: Per-process memo of file digests, keyed by the file's identity and change stamps.
_DIGEST_MEMO: dict[tuple[str, int, int, int, int, int], str] = {}
_DIGEST_MEMO_MAX = 500_000


def _file_digest(path: Path | str) -> str:
    """SHA-256 of a file's bytes, memoised per process on (path, device, inode, size, mtime_ns, ctime_ns).

    Any rewrite of a file changes its ctime (and usually size/mtime), so a
    changed file is hashed again; an unchanged one costs one ``stat`` call
    from the second epoch on.
    """
    st = os.stat(path)
    stamp = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _DIGEST_MEMO.get(stamp)
    if digest is not None:
        return digest
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if len(_DIGEST_MEMO) >= _DIGEST_MEMO_MAX:
        _DIGEST_MEMO.clear()
    _DIGEST_MEMO[stamp] = digest
    return digest


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class VolumeCache:
    """On-disk cache of preprocessed volumes.

    The key is the SHA-256 of: :data:`PREPROCESS_VERSION`, the parameters as
    sorted JSON, the salted hash of a constant (so a change of site salt
    invalidates the stored UID hashes), and the SHA-256 of the bytes of every
    input file of the image and the mask (sorted, so file names and listing
    order do not matter).  Entries live at ``<root>/<key[:2]>/<key>.npz``
    (arrays ``image``, ``roi``) and ``<key>.json`` (UID hashes, version, grid geometry),
    both written atomically (temporary file + ``os.replace``).  No path, name
    or DICOM tag other than hashed UIDs is stored.

    Parameters
    ----------
    root
        Cache folder (created if needed).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def key(self, image_path: str | Path, mask_path: str | Path | None, params: ImagingParams,
            *, roi: int | str | None = None, patient: str | None = None) -> str:
        """Cache key of an (image, mask, params[, roi]) tuple; hashes file bytes only."""
        h = hashlib.sha256()
        h.update(PREPROCESS_VERSION.encode())
        h.update(b"\0params\0" + params.to_json().encode())
        if roi is not None:  # absent from the key when None, so existing entries stay valid
            h.update(b"\0roi\0" + json.dumps([type(roi).__name__, str(roi)]).encode())
        h.update(b"\0salt\0" + hash_uid("radfusion-volume-cache").encode())
        for tag, p in (("image", image_path), ("mask", mask_path)):
            h.update(f"\0{tag}\0".encode())
            if p is None:
                h.update(b"none")
                continue
            digests = sorted(_file_digest(f) for f in _input_files(Path(p), patient=patient))
            h.update("\n".join(digests).encode())
        return h.hexdigest()

    def paths(self, key: str) -> tuple[Path, Path]:
        """(npz, json) paths of a key."""
        folder = self.root / key[:2]
        return folder / f"{key}.npz", folder / f"{key}.json"

    def load_preprocessed(
        self,
        image_path: str | Path,
        mask_path: str | Path | None,
        params: ImagingParams,
        *,
        roi: int | str | None = None,
        patient: str | None = None,
    ) -> PreprocessedVolume:
        """Preprocessed arrays of an image (and optional mask), from cache or computed.

        Parameters
        ----------
        image_path
            DICOM folder/file or NIfTI/NRRD/MetaImage file.
        mask_path
            ROI label image, or None (grid centred on the volume).
        params
            Preprocessing parameters; ``params.modality`` is the expected modality.
        roi
            Which ROI of the mask (segment number/label, RTSTRUCT ROI name,
            label value); None = all (see :func:`read_mask`).
        patient
            Study patient ID, only used in error messages.

        Returns
        -------
        PreprocessedVolume
        """
        key = self.key(image_path, mask_path, params, roi=roi, patient=patient)
        npz_path, json_path = self.paths(key)
        if npz_path.is_file() and json_path.is_file():
            try:
                with np.load(npz_path, allow_pickle=False) as data:
                    image = data["image"]
                    cached_roi = data["roi"]
                meta = json.loads(json_path.read_text())
                if "grid" in meta:  # entries written before the grid was kept are recomputed once
                    return PreprocessedVolume(image=image, roi=cached_roi.astype(bool, copy=False),
                                              uid_hashes=dict(meta["uid_hashes"]), cache_hit=True,
                                              grid=dict(meta["grid"]))
            except (OSError, ValueError, KeyError, json.JSONDecodeError):
                logger.warning("unreadable cache entry %s; recomputing", key)

        volume = read_image(image_path, modality=params.modality, patient=patient)
        uid_hashes = dict(volume.uid_hashes)
        mask = None
        if mask_path is not None:
            mask, mask_uids = _read_mask_with_uids(mask_path, volume, roi=roi, patient=patient)
            uid_hashes.update(mask_uids)
        image, roi, grid = preprocess(volume, mask, params, patient=patient, return_grid=True)

        npz_path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"version": PREPROCESS_VERSION, "uid_hashes": uid_hashes,
                "params": json.loads(params.to_json()), "grid": grid}
        _atomic_write(json_path, lambda fh: fh.write(json.dumps(meta, sort_keys=True).encode()))
        _atomic_write(npz_path, lambda fh: np.savez(fh, image=image, roi=roi))
        return PreprocessedVolume(image=image, roi=roi, uid_hashes=uid_hashes, cache_hit=False, grid=grid)
