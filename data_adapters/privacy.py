"""Pseudonymisation and hashing of identifiers.

Nothing that identifies a person leaves the adapters: study patient IDs are
replaced by salted-hash pseudonyms before they reach a batch, a log, a run
folder or the app, and DICOM UIDs are stored only as salted hashes (enough to
audit that a run used the same inputs, not enough to look them up).

The salt is a secret of the site running radfusion.  It is taken, in order,
from the ``RADFUSION_SALT`` environment variable or from the file
``~/.config/radfusion/salt`` (created with 32 random bytes on first use).  It
is never written into a run folder.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

_SALT_ENV = "RADFUSION_SALT"


def _salt_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "radfusion" / "salt"


def get_salt() -> bytes:
    """Return this site's pseudonymisation salt, creating it on first use."""
    env = os.environ.get(_SALT_ENV)
    if env:
        return env.encode("utf-8")
    path = _salt_file()
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(32).encode("ascii")
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(salt)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path.read_bytes().strip()


def salted_hash(value: str, *, salt: bytes | None = None, length: int = 16) -> str:
    """Hex digest (truncated to ``length``) of ``salt + value`` with SHA-256."""
    salt = get_salt() if salt is None else salt
    return hashlib.sha256(salt + b"\x00" + str(value).encode("utf-8")).hexdigest()[:length]


def pseudonymise(patient_id: str, *, salt: bytes | None = None) -> str:
    """Stable pseudonym ``P-xxxxxxxxxx`` for a study patient ID."""
    return "P-" + salted_hash(patient_id, salt=salt, length=10)


def hash_uid(uid: str, *, salt: bytes | None = None) -> str:
    """Salted hash of a DICOM UID (Study/Series/SOP/FrameOfReference)."""
    return "uid-" + salted_hash(uid, salt=salt, length=20)
