"""``radfusion inspect-image PATH [--modality M] [--json]``: what radfusion reads from one image.

Reads a DICOM series folder, an enhanced multi-frame DICOM file or a
NIfTI/NRRD/MetaImage file with :func:`data_adapters.imaging.read_image` (the
reader training uses) and prints its geometry in SimpleITK conventions and its
value range in physical units, so a user can check an input before a run.

Output fields (``--json`` prints exactly these keys)::

    modality         CT, PT, MR or OT
    size             [x, y, z] voxels (SimpleITK GetSize order)
    spacing          [x, y, z] mm
    origin           [x, y, z] mm (LPS) of voxel (0, 0, 0)
    direction        9 direction cosines, row-major, columns = index axes
    min, max         value range in physical units
    units            HU (CT), SUVbw (PET), a.u.
    series_uid_hash  salted hash of SeriesInstanceUID (null when not DICOM)
    problems         warnings about a readable image (list of strings)

Problems are things that read fine but deserve a look (non-finite values,
values implausible for the units, very anisotropic voxels, a single slice, an
oblique acquisition, a constant image, non-DICOM input without a
``--modality``).  Anything the reader rejects (several series in a folder, a
missing slice, missing rescale or PET dose tags, unreadable files ...) exits
with status 2 and the reason on stderr.  No DICOM PHI is printed: UIDs only
as salted hashes.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

__all__ = ["add_parser", "inspect", "run"]

#: Plausible physical ranges per unit (values outside are reported, not rejected).
_PLAUSIBLE = {"HU": (-1100.0, 4000.0), "SUVbw": (-5.0, 200.0)}
_ANISOTROPY = 5.0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``inspect-image`` on the CLI's sub-parsers (``func`` = :func:`run`)."""
    p = subparsers.add_parser(
        "inspect-image",
        help="print an image's modality, geometry, value range and problems",
        description="Read an image as radfusion does (DICOM folder/file, NIfTI, NRRD, MHA) and print its "
                    "geometry (SimpleITK conventions), value range in physical units and problems.",
    )
    p.add_argument("path", help="DICOM series folder, enhanced DICOM file, or .nii/.nii.gz/.nrrd/.mha file")
    p.add_argument("--modality", choices=["ct", "pet", "mri"], default=None,
                   help="expected modality (checked against DICOM; sets units for non-DICOM files)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    return p


def _problems(vol: Any, arr: np.ndarray, finite: np.ndarray, is_dicom: bool, modality_given: bool) -> list[str]:
    out: list[str] = []
    n_bad = int(arr.size - np.count_nonzero(finite))
    if n_bad:
        out.append(f"{n_bad} non-finite voxel value(s) (NaN/inf)")
    if not is_dicom and not modality_given:
        out.append("not DICOM and no --modality given: units unknown (CT must be stored in HU, PET in SUVbw)")
    if vol.modality == "CT" and vol.units != "HU":
        out.append("CT without RescaleSlope/RescaleIntercept: values are stored values, not HU")
    if vol.units in _PLAUSIBLE and np.any(finite):
        lo, hi = _PLAUSIBLE[vol.units]
        vmin, vmax = float(arr[finite].min()), float(arr[finite].max())
        if vmin < lo or vmax > hi:
            out.append(f"values {vmin:.4g}..{vmax:.4g} {vol.units} outside the plausible range {lo:g}..{hi:g} "
                       "(padding value, wrong rescale or wrong units?)")
    if np.any(finite) and float(arr[finite].min()) == float(arr[finite].max()):
        out.append("constant image")
    z, _, _ = arr.shape
    if z == 1:
        out.append("a single slice: not a volume")
    sp = np.asarray(vol.spacing)
    if sp.max() / sp.min() > _ANISOTROPY:
        out.append(f"very anisotropic voxels {tuple(round(float(s), 3) for s in sp)} mm "
                   f"(ratio {sp.max() / sp.min():.1f}); consider first_kernel=(1, 3, 3) or slice2d")
    d = vol.direction_matrix
    if not np.allclose(np.abs(d), np.round(np.abs(d)), atol=1e-3):
        out.append("oblique orientation: image axes are not aligned with the patient axes")
    return out


def inspect(path: str, *, modality: str | None = None) -> dict[str, Any]:
    """The report of one image (the ``--json`` dictionary).

    Raises
    ------
    data_adapters.errors.InputError
        When the reader rejects the input.
    """
    from pathlib import Path

    from data_adapters.imaging import DICOM_FILE_SUFFIXES, read_image

    vol = read_image(path, modality=modality)
    arr = vol.array
    finite = np.isfinite(arr)
    p = Path(path)
    is_dicom = p.is_dir() or p.name.lower().endswith(DICOM_FILE_SUFFIXES)
    z, y, x = arr.shape
    return {
        "modality": vol.modality,
        "size": [int(x), int(y), int(z)],
        "spacing": [float(v) for v in vol.spacing],
        "origin": [float(v) for v in vol.origin],
        "direction": [float(v) for v in vol.direction],
        "min": float(arr[finite].min()) if finite.any() else None,
        "max": float(arr[finite].max()) if finite.any() else None,
        "units": vol.units,
        "series_uid_hash": vol.uid_hashes.get("SeriesInstanceUID"),
        "problems": _problems(vol, arr, finite, is_dicom, modality is not None),
    }


def _fmt(values: list[float], digits: int = 4) -> str:
    return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"


def _table(report: dict[str, Any], path: str) -> str:
    rng = ("n/a" if report["min"] is None
           else f"{report['min']:.6g} .. {report['max']:.6g} {report['units']}")
    rows = [
        ("path", path),
        ("modality", report["modality"]),
        ("size (x, y, z)", " x ".join(str(v) for v in report["size"])),
        ("spacing (x, y, z) mm", _fmt(report["spacing"], 6)),
        ("origin (x, y, z) mm", _fmt(report["origin"], 6)),
        ("direction", _fmt(report["direction"], 4)),
        ("value range", rng),
        ("units", report["units"]),
        ("series UID (hashed)", report["series_uid_hash"] or "-"),
        ("problems", "none" if not report["problems"] else report["problems"][0]),
    ]
    rows += [("", p) for p in report["problems"][1:]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    """Run the command; 0 on success, 2 (reason on stderr) when the input is rejected."""
    from data_adapters.errors import InputError

    try:
        report = inspect(args.path, modality=getattr(args, "modality", None))
    except InputError as err:
        print(f"radfusion inspect-image: error: {err}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    else:
        print(_table(report, args.path))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m apps.inspect_image PATH``)."""
    parser = argparse.ArgumentParser(prog="radfusion")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect-image", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
