"""Data-parallel training (DDP over Gloo on CPU, two processes launched by torchrun).

With a loss that is a mean over patients, DDP's averaged gradients of the two halves of every batch equal the
gradient over the whole batch, so two processes must end with the weights of one process (float tolerance).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ddp_worker import make_problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process(tmp_path):
    from fusion.train import train_model

    torch.set_num_threads(1)
    model, train, val, cfg = make_problem()
    model, history = train_model(model, train, val, cfg, seed=5, device=torch.device("cpu"), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__).parent / "_ddp_worker.py"), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][k], ranks[1]["state"][k], rtol=0, atol=0)  # in sync
        torch.testing.assert_close(ranks[0]["state"][k], v, rtol=1e-4, atol=1e-5)  # = one process, whole batches
    assert [h["epoch"] for h in ranks[0]["history"]] == [h["epoch"] for h in history]
    np.testing.assert_allclose([h["val_auc"] for h in ranks[0]["history"]], [h["val_auc"] for h in history],
                               atol=1e-6)
    # each process trained on its own half of every batch (their losses differ), yet the weights agree
    assert all(abs(a["loss"] - b["loss"]) > 1e-6 for a, b in zip(ranks[0]["history"], ranks[1]["history"]))
    assert history[-1]["loss"] < history[0]["loss"]


def test_distributed_resume_is_refused(monkeypatch, tmp_path, capsys):
    from apps.cli import main

    cfg_path = ROOT / "configs" / "demo.yaml"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", str(cfg_path), "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "--resume is not supported for a distributed" in capsys.readouterr().err
