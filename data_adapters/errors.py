"""Errors raised on bad input.

Every adapter raises :class:`InputError` (a ``ValueError``) when a file, a
patient or a field does not meet the data contract.  The message always names
where the problem is (file, row, patient, field) and what was expected, so a
user can fix the input without reading our code.  Patient identifiers named
here are the study's own ``patient_id`` values from the manifest, never DICOM
PHI (PatientName, PatientID, BirthDate ...), which adapters do not echo.
"""
from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input, located precisely.

    Parameters
    ----------
    message
        What is wrong and what was expected.
    file
        The offending file or folder.
    patient
        The study ``patient_id`` concerned, if any.
    field
        The column, DICOM keyword or config key concerned, if any.
    row
        1-based data row number in a table (header not counted), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        patient: str | None = None,
        field: str | None = None,
        row: int | None = None,
    ) -> None:
        self.message = message
        self.file = None if file is None else str(file)
        self.patient = patient
        self.field = field
        self.row = row
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.patient is not None:
            where.append(f"patient {self.patient}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message
