"""Training loop with early stopping on a validation metric, checkpoint and resume.

Full-split tensors live in memory (the demo and typical cohorts of a few
hundred patients fit easily once volumes are preprocessed and cached),
mini-batches are index selections, and the best epoch by the validation
metric is restored at the end: Harrell's C for survival (Cox and
discrete-time heads alike, on the model's ``risk``), ROC AUC for binary and
macro one-vs-rest ROC AUC for multiclass classification (on ``proba``; see
:func:`validation_score`).

Resume: with ``state_path`` the complete training state (weights, optimiser
moments, every random generator the loop draws from — torch, numpy, Python,
the batch-order generator and the MONAI augmentation generators — the early
stopping counters and the best weights so far) is written atomically after
every epoch.  Restarting with the same arguments continues from the last
completed epoch and, on CPU, ends with bit-identical weights and therefore
identical metrics to an uninterrupted run.

Mixed precision (``training.amp``) uses ``torch.autocast`` with bfloat16 on
CUDA devices that support it (float16 with a gradient scaler otherwise); it is
ignored on CPU.

Data-parallel training: when a ``torch.distributed`` process group is
initialised (``torchrun --nproc_per_node N``, see :mod:`apps.cli`), the model is
wrapped in ``DistributedDataParallel`` (NCCL on GPUs, Gloo on CPU).  Every
process draws the same shuffled batches from the same seed and trains on its
share of each (``batch[rank::N]``); gradients are averaged by DDP, so with a
loss that is a mean over patients (classification) an N-process step equals
the single-process step on the whole batch.  The Cox partial likelihood is
computed within each process's share (risk sets of batch_size / N patients).
The adversary's inner updates are local and its weights are averaged after
each step; early stopping follows rank 0's validation score; only rank 0
writes the resume state.
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
from fusion.provenance import load_checkpoint, save_checkpoint
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


#: Optional per-patient model outputs that :func:`predict` passes through when the model returns them.
_EXTRA_OUTPUTS = ("proba", "survival", "aux_proba")


@torch.no_grad()
def predict(model: torch.nn.Module, tensors: dict, *, device: torch.device, batch_size: int = 128) -> dict:
    """Risk ``(N,)`` and fused embedding ``(N, D)`` for every patient of ``tensors``.

    Also ``proba`` ``(N, K)`` (classification), ``survival`` ``(N, K)``
    (discrete-time survival) and ``aux_proba`` (``task.multitask``) when the
    model outputs them.
    """
    model.eval()
    n = tensors["present"].shape[0]
    risks, embs, extra = [], [], {}
    for start in range(0, n, batch_size):
        b = to_device(take(tensors, np.arange(start, min(n, start + batch_size))), device)
        out = model(b)
        risks.append(out["risk"].float().cpu())
        embs.append(out["embedding"].float().cpu())
        for k in _EXTRA_OUTPUTS:
            if k in out:
                extra.setdefault(k, []).append(out[k].float().cpu())
    res = {"risk": torch.cat(risks).numpy(), "embedding": torch.cat(embs).numpy()}
    res.update({k: torch.cat(v).numpy() for k, v in extra.items()})
    return res


def macro_auc(y: np.ndarray, proba: np.ndarray) -> float:
    """ROC AUC of class indices ``y`` (``-1`` = unknown, skipped) against ``proba`` ``(N, K)``.

    Binary: AUC of ``proba[:, 1]``.  Multiclass: the mean one-vs-rest AUC
    over the classes that have both positives and negatives among the known
    labels (scikit-learn's macro average when every class is present).  NaN
    when no class qualifies.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).reshape(-1)
    proba = np.asarray(proba, dtype=float)
    keep = y >= 0
    y, proba = y[keep], proba[keep]
    cols = [1] if proba.shape[1] == 2 else range(proba.shape[1])
    aucs = [roc_auc_score(y == k, proba[:, k]) for k in cols if 0 < (y == k).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def validation_score(model: torch.nn.Module, val: dict, pred: dict) -> tuple[str, float]:
    """The early-stopping metric (name, value; higher is better) of ``pred = predict(model, val)``."""
    if getattr(model, "task", "cox") == "classification":
        return "val_auc", macro_auc(val["label"].numpy(), pred["proba"])
    return "val_c_index", harrell_c(val["event"].numpy(), val["time"].numpy(), pred["risk"])


def _augment_batch(b: dict, augment: dict) -> dict:
    b = dict(b)
    names = list(b["modalities"])
    for m, fn in augment.items():
        x = b[m].clone()
        for i in torch.nonzero(b["present"][:, names.index(m)], as_tuple=False).reshape(-1).tolist():
            x[i] = torch.as_tensor(fn(x[i]), dtype=x.dtype)
        b[m] = x
    return b


def _random_objects(obj, seen=None) -> list:
    """Every MONAI ``Randomizable`` (anything with a ``RandomState`` ``R``) reachable from an augmentation."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    found = [obj] if isinstance(getattr(obj, "R", None), np.random.RandomState) else []
    for attr in ("transform", "transforms"):
        child = getattr(obj, attr, None)
        if isinstance(child, (list, tuple)):
            for c in child:
                found += _random_objects(c, seen)
        elif child is not None:
            found += _random_objects(child, seen)
    return found


def _rng_state(rng: np.random.Generator, augment: dict | None) -> dict:
    import random

    def rs(state):  # numpy RandomState tuple -> weights_only-safe
        return [state[0], torch.from_numpy(np.asarray(state[1], dtype=np.int64)), *state[2:]]

    aug = {m: [rs(o.R.get_state()) for o in _random_objects(fn)] for m, fn in (augment or {}).items()}
    return {"torch": torch.get_rng_state(), "numpy": rs(np.random.get_state()), "python": random.getstate(),
            "batches": rng.bit_generator.state, "augment": aug,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict, rng: np.random.Generator, augment: dict | None) -> None:
    import random

    def rs(s):
        return (s[0], s[1].numpy().astype(np.uint32), *s[2:])

    torch.set_rng_state(state["torch"])
    np.random.set_state(rs(state["numpy"]))
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    rng.bit_generator.state = state["batches"]
    for m, fn in (augment or {}).items():
        for o, s in zip(_random_objects(fn), state["augment"].get(m, [])):
            o.R.set_state(rs(s))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fault_injection(desc: str, epoch: int) -> None:
    """Test hook: ``RADFUSION_KILL_AFTER="<desc>:<epoch>"`` SIGKILLs this process once that epoch's
    training state is on disk (used to test resume after a real kill)."""
    import os
    import signal

    spec = os.environ.get("RADFUSION_KILL_AFTER")
    if spec and spec == f"{desc}:{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)


def distributed_context() -> tuple[int, int]:
    """(rank, world size) of an initialised ``torch.distributed`` process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_parameters(module: torch.nn.Module, world: int) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for p in module.parameters():
            dist.all_reduce(p.data)
            p.data /= world


def _broadcast_float(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


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
    state_path=None,
    batch_order=None,
) -> tuple[torch.nn.Module, list[dict]]:
    """Fit ``model`` on ``train``; keep the epoch with the best validation c-index.

    Returns the model (best weights loaded, eval mode) and the per-epoch history
    (``epoch``, ``loss``, and ``val_c_index`` or, for classification, ``val_auc``;
    see :func:`validation_score`).  A model with an ``adversary`` gets
    its gradient-reversal strength set every step by the DANN schedule, scaled
    to ``lambda_max``, and ``adversary_steps`` adversary-only updates after
    every step (see :func:`fusion.adversarial.adversary_inner_steps`).
    ``augment`` maps an image modality to a per-volume augmentation applied to
    training batches only (never to validation or prediction).  ``state_path``
    enables checkpoint and resume (see the module docstring); the caller
    removes the file once the final checkpoint is safely written.  ``batch_order(rng) -> list of index arrays``
    replaces the default shuffled near-equal batches (e.g. site-stratified
    batches).
    """
    from pathlib import Path
    seed_everything(seed)
    rank, world = distributed_context()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    model.to(device)
    net = model
    if world > 1:
        if cfg.batch_size < world:
            raise ValueError(f"training.batch_size ({cfg.batch_size}) must be >= the number of processes ({world})")
        from torch.nn.parallel import DistributedDataParallel

        # Missing modalities and modality dropout leave encoders unused in some steps.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    n = train["present"].shape[0]
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total_steps = max(1, cfg.epochs * steps_per_epoch - 1)
    adversary = getattr(model, "adversary", None)
    adv_opt = (torch.optim.Adam(adversary.parameters(), lr=cfg.lr)
               if adversary is not None and adversary_steps > 0 else None)
    sharing_modules = []
    if getattr(cfg, "parameter_sharing", 0.0) > 0 and hasattr(model, "encoders"):
        from fusion.losses import parameter_sharing_penalty

        sharing_modules = [model.encoders[m] for m in ("ct", "mri", "pet") if m in model.encoders]
        if len(sharing_modules) < 2:
            sharing_modules = []
    use_amp = bool(getattr(cfg, "amp", False)) and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    # With an adversary, only epochs where the DANN schedule has reached 90% of its strength are model-
    # selection candidates: the validation patients come from the training sites, where a confounder
    # shortcut still works, so selecting over the ramp-up would pick the epochs before the confounder is
    # removed.  lambda_p >= 0.9 lambda_max <=> p >= ln(19) / gamma (gamma = 10).
    select_from = 0
    if adversary is not None and lambda_max > 0:
        select_from = min(cfg.epochs - 1, int(math.ceil(cfg.epochs * math.log(19.0) / 10.0)))
    step, start_epoch = 0, 0
    best_c, best_state, best_epoch, bad = -np.inf, None, -1, 0
    history: list[dict] = []
    state_path = Path(state_path) if state_path is not None else None
    if state_path is not None and state_path.exists():
        st = load_checkpoint(state_path)
        if st.get("desc") != desc or st.get("seed") != seed:
            raise ValueError(f"{state_path} belongs to another training ({st.get('desc')!r}, seed {st.get('seed')}); "
                             "remove it or train into a fresh run folder")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        if adv_opt is not None and st.get("adv_optimizer"):
            adv_opt.load_state_dict(st["adv_optimizer"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        step, start_epoch = int(st["step"]), int(st["epoch"]) + 1
        best_c, best_epoch, bad = float(st["best_c"]), int(st["best_epoch"]), int(st["bad"])
        best_state, history = st["best_state"], list(st["history"])
        _set_rng_state(st["rng"], rng, augment)
        log.info("%s: resumed after epoch %d from %s", desc, start_epoch - 1, state_path.name)
    stopped = bad >= cfg.patience
    bar = tqdm(range(start_epoch, cfg.epochs), desc=desc, disable=not progress or stopped, leave=False)
    for epoch in ([] if stopped else bar):
        model.train()
        losses = []
        batches = batch_order(rng) if batch_order is not None else _batches(n, cfg.batch_size, rng)
        for idx in batches:
            if adversary is not None:
                adversary.lambd = lambda_max * dann_lambda(min(1.0, step / total_steps))
            step += 1
            if world > 1:  # every process draws the same batches and takes its own share of each
                idx = np.asarray(idx)[rank::world]
            b = take(train, idx)
            if augment:
                b = _augment_batch(b, augment)
            b = to_device(b, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                out = net(b)
            loss = out["loss"].float()
            for mod in model.modules():  # encoder regularisers, e.g. pathway_mlp_glasso's group lasso
                pen = getattr(mod, "penalty", None)
                if mod is not model and callable(pen):
                    loss = loss + pen()
            if sharing_modules:  # soft parameter sharing between the image encoders
                loss = loss + cfg.parameter_sharing * parameter_sharing_penalty(sharing_modules)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if adv_opt is not None and "confounders" in b:
                with torch.no_grad():  # the updated encoders' embedding of this batch
                    z_now = model({k: v for k, v in b.items() if k not in ("time", "event", "label")})[
                        "adversary_input"]
                adversary_inner_steps(adversary, adv_opt, z_now, b["confounders"], adversary_steps)
                if world > 1:
                    _average_parameters(adversary, world)
            losses.append(float(loss.detach()))
        pv = predict(model, val, device=device)
        metric, c = validation_score(model, val, pv)
        if world > 1:  # rank 0's score decides, so every process stops at the same epoch
            c = _broadcast_float(c, device)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), metric: c})
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", **{metric: f"{c:.3f}"})
        history[-1]["adversary_lambda"] = float(adversary.lambd) if adversary is not None else None
        if epoch < select_from:
            pass  # adversary still ramping up: not a candidate, no patience used
        elif c > best_c + 1e-6:
            best_c, best_epoch, bad = c, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        if state_path is not None and rank == 0:
            save_checkpoint(state_path, {
                "desc": desc, "seed": seed, "epoch": epoch, "step": step,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "adv_optimizer": adv_opt.state_dict() if adv_opt is not None else None,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "best_c": float(best_c), "best_epoch": best_epoch, "bad": bad,
                "best_state": best_state, "history": history, "rng": _rng_state(rng, augment),
            })
        _fault_injection(desc, epoch)
        if bad >= cfg.patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    log.info("%s: best epoch %d, validation %s %.3f", desc, best_epoch,
             "ROC AUC" if getattr(model, "task", "cox") == "classification" else "c-index", best_c)
    return model, history
