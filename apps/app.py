"""``radfusion app --run RUN [--host 127.0.0.1] [--port 8501]``: the clinician-facing Streamlit explorer.

:func:`launch` starts ``streamlit run apps/streamlit_app.py`` in a subprocess
(headless, bound to ``127.0.0.1`` unless told otherwise, no usage statistics,
no error details or tracebacks in the browser) and returns the
:class:`subprocess.Popen`; :func:`cmd_app` is the blocking CLI command.  The
run folder is passed on the script's command line after ``--`` and in the
``RADFUSION_RUN`` environment variable.

The app shows patient-level predictions (pseudonymised): bind it to another
address than localhost only on a trusted network.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["SCRIPT", "add_parser", "cmd_app", "launch", "streamlit_command", "url"]

#: The Streamlit script.
SCRIPT = Path(__file__).resolve().with_name("streamlit_app.py")

_LOCAL = {"127.0.0.1", "localhost", "::1"}


def url(host: str = "127.0.0.1", port: int = 8501) -> str:
    """The app's address (``http://host:port/``)."""
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}/"


def streamlit_command(run: str | Path, *, host: str = "127.0.0.1", port: int = 8501,
                      headless: bool = True) -> list[str]:
    """The ``python -m streamlit run ...`` command line that serves ``run``."""
    return [
        sys.executable, "-m", "streamlit", "run", str(SCRIPT),
        "--server.address", host,
        "--server.port", str(int(port)),
        "--server.headless", "true" if headless else "false",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--browser.gatherUsageStats", "false",
        "--client.showErrorDetails", "false",
        "--client.toolbarMode", "minimal",
        "--global.developmentMode", "false",
        "--", "--run", str(Path(run).resolve()),
    ]


def launch(run: str | Path, *, host: str = "127.0.0.1", port: int = 8501, headless: bool = True,
           env: dict[str, str] | None = None, **popen_kwargs: Any) -> subprocess.Popen:
    """Start the app on ``run`` in a subprocess and return it (the caller stops it with ``terminate()``).

    The run folder is checked first (a :class:`apps.app_data.RunFolderError` names what is missing).  The server
    needs a few seconds before it answers HTTP at :func:`url`.

    Parameters
    ----------
    run
        A run folder (``radfusion train --out RUN``, or ``DIR/run`` after ``radfusion demo --out DIR``).
    host, port
        Address to bind; the default serves this machine only.
    headless
        Do not open a browser window.
    env
        Extra environment variables for the server.
    **popen_kwargs
        Passed to :class:`subprocess.Popen` (e.g. ``stdout``, ``stderr``).
    """
    from apps.app_data import load_run

    load_run(run)  # fail here, not in the browser
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {port}")
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["RADFUSION_RUN"] = str(Path(run).resolve())
    full_env.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    repo = str(SCRIPT.parent.parent)
    full_env["PYTHONPATH"] = repo + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    return subprocess.Popen(streamlit_command(run, host=host, port=port, headless=headless), env=full_env,
                            **popen_kwargs)


def wait_until_ready(host: str = "127.0.0.1", port: int = 8501, *, timeout: float = 60.0,
                     proc: subprocess.Popen | None = None) -> bool:
    """Poll the server's health endpoint until it answers (``True``) or ``timeout`` seconds pass or ``proc``
    exits (``False``)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url(host, port) + "_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    return False


def cmd_app(args: argparse.Namespace) -> int:
    """Serve the app until Ctrl+C (the ``radfusion app`` command)."""
    if args.host not in _LOCAL:
        print(f"radfusion app: warning: serving on {args.host}: the app shows patient-level (pseudonymised) "
              "predictions; do this only on a trusted network", file=sys.stderr)
    proc = launch(args.run, host=args.host, port=args.port, headless=True)
    quiet = getattr(args, "quiet", False)
    previous = _stop_on_sigterm()
    try:
        if wait_until_ready(args.host, args.port, timeout=60.0, proc=proc):
            if not quiet:
                print(f"radfusion app: serving {Path(args.run)} at {url(args.host, args.port)}  (Ctrl+C to stop)")
        elif proc.poll() is not None:
            print(f"radfusion app: error: the Streamlit server exited with status {proc.returncode} (is port "
                  f"{args.port} already in use? try --port)", file=sys.stderr)
            return 2
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def _stop_on_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so that the server subprocess is stopped too (main thread only)."""
    try:
        return signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        return None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``app`` on the CLI's sub-parsers (``func`` = :func:`cmd_app`)."""
    p = subparsers.add_parser(
        "app",
        help="explore a run in the browser (cohort overview, one patient at a time)",
        description="Serve the Streamlit explorer for a run folder: Kaplan-Meier curves by predicted risk group, "
                    "per-site metrics, ablations, and per patient the fused risk, survival curve, out-of-distribution "
                    "flag, modality and feature attributions, pathway scores, EHR timeline and images with Grad-CAM. "
                    "Only pseudonymised IDs are shown.",
    )
    p.add_argument("--run", required=True, help="run folder (radfusion train --out RUN, or DIR/run after "
                                                "radfusion demo --out DIR)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=cmd_app)
    return p
