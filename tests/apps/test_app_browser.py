"""End to end in a real browser: ``apps.app.launch`` serves a small run, Debian's headless Chromium opens the
patient view by URL, and the screenshot and DOM are checked (rendered, no error box, no traceback).

Why the DevTools protocol rather than ``chromium --screenshot --virtual-time-budget``: a Streamlit page is an empty
shell until the script's output arrives over a WebSocket, and Chromium's virtual time runs ahead of that socket (the
budget is spent in a few real seconds, so ``--screenshot`` / ``--dump-dom`` capture the loading skeleton or a blank
page).  Chromium is therefore driven over ``--remote-debugging-pipe`` (no extra Python package): the test waits in
real time until the page has rendered, then captures the screenshot (``Page.captureScreenshot``) and the DOM.

Chromium missing: the test fails under ``CI=true`` (``.ci/setup`` installs it) and is skipped otherwise.
"""
from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from apps import app_data as ad
from apps.app import launch, streamlit_command, wait_until_ready
from apps.cli import main
from fusion.config import default_config_dir

pytestmark = pytest.mark.slow

WIDTH, HEIGHT = 1400, 2000
#: Background of Streamlit's st.error box (light theme), RGB, as rendered by Chromium.
ERROR_BG = np.array([255, 241, 242])


# ------------------------------------------------------------------------------------------------ Chromium


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    msg = "Debian's chromium is not installed (apt-get install chromium; .ci/setup does this)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on ``--remote-debugging-pipe`` (fd 3 in, fd 4 out;
    messages are JSON terminated by NUL)."""

    def __init__(self, binary: str, *, width: int = WIDTH, height: int = HEIGHT, log: Path | None = None):
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()
        # move the child's ends above fd 9 so that the shell can place them on fds 3 and 4
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, resp_w)]
        os.close(cmd_r)
        os.close(resp_w)
        cmd_r, resp_w = hi
        args = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--mute-audio",
                "--no-first-run", "--disable-extensions", "--remote-debugging-pipe",
                f"--window-size={width},{height}", "about:blank"]
        err = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{cmd_r} 4>&{resp_w} {cmd_r}<&- {resp_w}>&-', "bash", *args],
            pass_fds=(cmd_r, resp_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        os.close(cmd_r)
        os.close(resp_w)
        self.width, self.height = width, height
        self._id = 0
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.session = None

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._resp_r, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    msg = json.loads(raw)
                    if "id" in msg:
                        with self._cond:
                            self._replies[msg["id"]] = msg
                            self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, *, timeout: float = 60.0) -> dict:
        self._id += 1
        i = self._id
        msg = {"id": i, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while i not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"Chromium did not answer {method} (exit status {self.proc.poll()})")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(i)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return r.get("result", {}).get("value")

    def wait_rendered(self, must_contain: list[str], *, timeout: float = 180.0) -> dict:
        """Poll until the page text holds every string of ``must_contain``, no loading skeleton is left and the
        number of elements has not changed for two polls (or an exception box appears); the last state."""
        probe = ("JSON.stringify({text: document.body ? document.body.innerText : '',"
                 " h1: Array.from(document.querySelectorAll('h1')).map(e => e.innerText.trim()),"
                 " n: document.querySelectorAll('[data-testid]').length,"
                 " skeletons: document.querySelectorAll('[data-testid=\"stSkeleton\"]').length,"
                 " exceptions: document.querySelectorAll('[data-testid=\"stException\"]').length})")
        deadline, last_n, stable, state = time.monotonic() + timeout, -1, 0, {}
        while time.monotonic() < deadline:
            state = json.loads(self.js(probe) or "{}")
            if state.get("exceptions"):
                return state
            ready = all(s in state.get("text", "") for s in must_contain) and not state.get("skeletons")
            stable = stable + 1 if (ready and state.get("n") == last_n) else 0
            last_n = state.get("n")
            if stable >= 2:
                return state
            time.sleep(0.75)
        return state

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def dom(self) -> str:
        return self.js("document.documentElement.outerHTML")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)


# ------------------------------------------------------------------------------------------------ fixtures


def _small_config(cohort: Path, tmp: Path, *, epochs=3, seed=0) -> Path:
    cfg = yaml.safe_load((default_config_dir() / "demo.yaml").read_text())
    cfg["data"]["root"] = str(cohort)
    cfg["seed"] = seed
    cfg["training"].update(epochs=epochs, patience=epochs, batch_size=16)
    for m in ("ct", "pet", "mri"):
        cfg["modalities"][m]["preprocessing"]["size"] = [16, 16, 16]
        cfg["modalities"][m]["encoder_kwargs"] = {"channels": [4, 8]}
    p = tmp / f"cfg_{seed}_{epochs}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _shared_app_run(tmp_path_factory) -> tuple[Path, Path]:
    """The same cohort and run as test_app.py's (built once per pytest session, whichever module runs first)."""
    base = tmp_path_factory.getbasetemp() / "radfusion_app"
    cohort, run = base / "cohort", base / "run"
    if not (cohort / "manifest.csv").exists():
        assert main(["-q", "make-demo-cohort", "--out", str(cohort), "--patients", "48", "--sites", "3",
                     "--seed", "1", "--workers", "1"]) == 0
    if not (run / "metrics.json").exists():
        assert main(["-q", "train", "--config", str(_small_config(cohort, base)), "--out", str(run),
                     "--overwrite"]) == 0
    return cohort, run


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _complete_test_patient(cohort: Path, run: ad.RunInfo) -> str:
    """Same choice as test_app.py: the first held-out patient in the app's order who has every modality."""
    from data_adapters.privacy import pseudonymise

    truth = json.loads((cohort / "ground_truth.json").read_text())["patients"]
    complete = {pseudonymise(pid) for pid, p in truth.items() if all(p["has"].values())}
    return next(p for p in ad.patient_choices(run.predictions) if p in complete)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def chromium():
    return _chromium()


@pytest.fixture(scope="module")
def served(chromium, tmp_path_factory):
    """(url, patient, server log): the app on the shared run, its patient explained in advance (cached)."""
    cohort, run = _shared_app_run(tmp_path_factory)
    patient = _complete_test_patient(cohort, ad.load_run(run))
    ad.compute_explanation(run, patient)  # no-op when test_app.py has computed it through the app
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    with open(log, "wb") as out:
        proc = launch(run, port=port, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until_ready("127.0.0.1", port, timeout=90, proc=proc), f"server did not start:\n{_tail(log)}"
        yield f"http://127.0.0.1:{port}/", patient, log
    finally:
        _stop(proc)


def _capture(binary: str, url: str, must_contain: list[str], tmp: Path, *, timeout: float = 180.0):
    browser = Chromium(binary, log=tmp / "chromium.log")
    try:
        browser.open(url)
        state = browser.wait_rendered(must_contain, timeout=timeout)
        png, dom = browser.screenshot(), browser.dom()
    finally:
        browser.close()
    (tmp / "page.png").write_bytes(png)
    (tmp / "page.html").write_text(dom)
    return png, dom, state


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _error_pixels(rgb: np.ndarray) -> int:
    return int((np.abs(rgb - ERROR_BG).max(axis=-1) <= 3).sum())


# ------------------------------------------------------------------------------------------------ tests


def test_patient_view_renders_in_chromium(chromium, served, tmp_path):
    url, patient, log = served
    heading = f"Patient {patient}"
    png, dom, state = _capture(chromium, f"{url}?page=patient&patient={patient}",
                               [heading, "Images", "pseudonymised data only"], tmp_path)
    where = f"(screenshot {tmp_path / 'page.png'}; server log tail:\n{_tail(log)})"
    assert heading in state.get("text", ""), f"the patient view did not render {where}"
    # the DOM: the patient heading, the viewer, no exception or traceback, no error box
    assert "stException" not in dom and "Traceback" not in dom, where
    assert "stAlertContentError" not in dom, where
    assert heading in state.get("h1", []), (state.get("h1"), where)
    for testid in ("stSlider", "stImage", "stMetric", "stDataFrame"):
        assert f'data-testid="{testid}"' in dom, (testid, where)
    # the screenshot: a rendered page, not a blank or skeleton one, and no red error box
    rgb = _pixels(png)
    assert rgb.shape == (HEIGHT, WIDTH, 3)
    assert rgb.std() > 15, f"screenshot looks blank {where}"
    colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    ink = np.abs(rgb - colours[counts.argmax()]).max(axis=-1) > 30  # clearly not background (skeletons are not)
    assert ink.mean() > 0.02, f"only {ink.mean():.1%} of the screenshot differs from the background {where}"
    assert ink.any(axis=1).mean() > 0.4, f"content fills only {ink.any(axis=1).mean():.0%} of the rows {where}"
    assert _error_pixels(rgb) < 1000, f"an error box is visible {where}"


def test_error_box_is_detected(chromium, tmp_path_factory, tmp_path):
    """Control for the checks above: the app on a folder that is not a run shows a red st.error box, which the
    screenshot and DOM checks detect."""
    cohort, _ = _shared_app_run(tmp_path_factory)
    port = _free_port()
    log = tmp_path / "streamlit.log"
    env = dict(os.environ, RADFUSION_RUN=str(cohort))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "wb") as out:  # launch() refuses a non-run folder, so start streamlit directly
        proc = subprocess.Popen(streamlit_command(cohort, port=port), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until_ready("127.0.0.1", port, timeout=90, proc=proc), _tail(log)
        png, dom, _ = _capture(chromium, f"http://127.0.0.1:{port}/", ["Cannot open the run"], tmp_path,
                               timeout=60)
    finally:
        _stop(proc)
    assert "stAlertContentError" in dom and "not a radfusion run folder" in dom
    assert "Traceback" not in dom and "stException" not in dom
    assert _error_pixels(_pixels(png)) > 5000
