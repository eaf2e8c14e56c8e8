"""Worker of tests/fusion/test_distributed.py, launched by ``python -m torch.distributed.run``.

Trains the model of :func:`make_problem` with ``fusion.train.train_model`` inside a Gloo process group and
saves this rank's final weights and history to ``OUT/rank<k>.pt``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_problem():
    """A small two-modality binary classifier (no dropout, no batch norm) and its train/validation tensors."""
    from encoders.registry import create_encoder
    from fusion.config import TrainingConfig
    from fusion.model import FusionModel
    from fusion.strategies import create_fusion

    g = torch.Generator().manual_seed(3)

    def tensors(n):
        clin, om = torch.randn(n, 5, generator=g), torch.randn(n, 6, generator=g)
        present = torch.ones(n, 2, dtype=torch.bool)
        present[::5, 1] = False  # some patients miss omics
        label = ((clin[:, 0] + om[:, 1] * present[:, 1] + 0.3 * torch.randn(n, generator=g)) > 0).long()
        return {"modalities": ["clinical", "omics"], "present": present, "clinical": clin, "omics": om,
                "label": label}

    torch.manual_seed(0)
    enc = {"clinical": create_encoder("mlp", 5, 4, hidden=[8], dropout=0.0),
           "omics": create_encoder("mlp", 6, 4, hidden=[8], dropout=0.0)}
    model = FusionModel(enc, create_fusion("concat", {"clinical": 4, "omics": 4}, 8, dropout=0.0),
                        torch.nn.Linear(8, 1), task="classification", classes=["0", "1"])
    cfg = TrainingConfig(epochs=4, batch_size=16, lr=0.01, patience=10, device="cpu")
    return model, tensors(96), tensors(48), cfg


def main(out: str) -> None:
    import torch.distributed as dist

    from fusion.train import train_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, train, val, cfg = make_problem()
    model, history = train_model(model, train, val, cfg, seed=5, device=torch.device("cpu"), progress=False)
    torch.save({"state": model.state_dict(), "history": history}, Path(out) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
