"""Provenance of a run: what code, packages, seeds and inputs produced it."""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = (
    "radfusion", "torch", "monai", "numpy", "pandas", "scipy", "pydicom", "SimpleITK", "scanpy", "anndata",
    "gseapy", "scikit-learn", "scikit-survival", "lifelines", "pydantic", "shap", "streamlit", "torch-geometric",
)


def code_version() -> dict:
    """Git commit (and whether the tree had uncommitted changes) or the package version."""
    repo = Path(__file__).resolve().parents[1]
    out: dict = {"package_version": _version("radfusion")}
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict:
    return {p: _version(p) for p in PACKAGES}


def file_sha256(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def provenance(*, seed: int, input_files: dict, uid_hashes: dict) -> dict:
    return {
        "seed": seed,
        "code": code_version(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "input_file_sha256": {k: file_sha256(v) for k, v in input_files.items() if v},
        "dicom_uid_hashes": uid_hashes,
    }


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """``torch.save`` to a temporary file then rename: never a half-written checkpoint."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """Load with ``weights_only=True`` (no arbitrary code from a checkpoint)."""
    return torch.load(path, map_location="cpu", weights_only=True)
