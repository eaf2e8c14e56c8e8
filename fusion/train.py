"""Training loop with early stopping on the validation c-index.

Kept deliberately small: full-split tensors live in memory (the demo and
typical cohorts of a few hundred patients fit easily once volumes are
preprocessed and cached), mini-batches are index selections, and the best
epoch by validation Harrell's C is restored at the end.
"""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from fusion.adversarial import adversary_inner_steps, dann_lambda
from fusion.config import TrainingConfig
from fusion.data import take, to_device
from fusion.metrics import harrell_c

log = logging.getLogger("radfusion")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device is 'cuda' but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@torch.no_grad()
def predict(model: torch.nn.Module, tensors: dict, *, device: torch.device, batch_size: int = 128) -> dict:
    """Risk ``(N,)`` and fused embedding ``(N, D)`` for every patient of ``tensors``."""
    model.eval()
    n = tensors["time"].shape[0]
    risks, embs = [], []
    for start in range(0, n, batch_size):
        b = to_device(take(tensors, np.arange(start, min(n, start + batch_size))), device)
        out = model(b)
        risks.append(out["risk"].float().cpu())
        embs.append(out["embedding"].float().cpu())
    return {"risk": torch.cat(risks).numpy(), "embedding": torch.cat(embs).numpy()}


def _augment_batch(b: dict, augment: dict) -> dict:
    b = dict(b)
    names = list(b["modalities"])
    for m, fn in augment.items():
        x = b[m].clone()
        for i in torch.nonzero(b["present"][:, names.index(m)], as_tuple=False).reshape(-1).tolist():
            x[i] = torch.as_tensor(fn(x[i]), dtype=x.dtype)
        b[m] = x
    return b


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    perm = rng.permutation(n)
    k = max(1, math.ceil(n / batch_size))
    # Near-equal batches: no tiny last batch (the Cox loss needs comparable pairs).
    return [b for b in np.array_split(perm, k) if len(b) > 0]


def train_model(
    model: torch.nn.Module,
    train: dict,
    val: dict,
    cfg: TrainingConfig,
    *,
    seed: int,
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
    lambda_max: float = 1.0,
    adversary_steps: int = 0,
    augment: dict | None = None,
) -> tuple[torch.nn.Module, list[dict]]:
    """Fit ``model`` on ``train``; keep the epoch with the best validation c-index.

    Returns the model (best weights loaded, eval mode) and the per-epoch history
    (``epoch``, ``loss``, ``val_c_index``).  A model with an ``adversary`` gets
    its gradient-reversal strength set every step by the DANN schedule, scaled
    to ``lambda_max``, and ``adversary_steps`` adversary-only updates after
    every step (see :func:`fusion.adversarial.adversary_inner_steps`).
    ``augment`` maps an image modality to a per-volume augmentation applied to
    training batches only (never to validation or prediction).
    """
    seed_everything(seed)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    n = train["time"].shape[0]
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total_steps = max(1, cfg.epochs * steps_per_epoch - 1)
    adversary = getattr(model, "adversary", None)
    adv_opt = (torch.optim.Adam(adversary.parameters(), lr=cfg.lr)
               if adversary is not None and adversary_steps > 0 else None)
    step = 0
    best_c, best_state, best_epoch, bad = -np.inf, None, -1, 0
    history: list[dict] = []
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        losses = []
        for idx in _batches(n, cfg.batch_size, rng):
            if adversary is not None:
                adversary.lambd = lambda_max * dann_lambda(min(1.0, step / total_steps))
            step += 1
            b = take(train, idx)
            if augment:
                b = _augment_batch(b, augment)
            b = to_device(b, device)
            out = model(b)
            loss = out["loss"]
            for mod in model.modules():  # encoder regularisers, e.g. pathway_mlp_glasso's group lasso
                pen = getattr(mod, "penalty", None)
                if mod is not model and callable(pen):
                    loss = loss + pen()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if adv_opt is not None and "confounders" in b:
                with torch.no_grad():  # the updated encoders' embedding of this batch
                    z_now = model({k: v for k, v in b.items() if k not in ("time", "event")})["embedding"]
                adversary_inner_steps(adversary, adv_opt, z_now, b["confounders"], adversary_steps)
            losses.append(float(loss.detach()))
        pv = predict(model, val, device=device)
        c = harrell_c(val["event"].numpy(), val["time"].numpy(), pv["risk"])
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_c_index": c})
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_c=f"{c:.3f}")
        if c > best_c + 1e-6:
            best_c, best_epoch, bad = c, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    log.info("%s: best epoch %d, validation c-index %.3f", desc, best_epoch, best_c)
    return model, history
