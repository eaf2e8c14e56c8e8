"""The ``radfusion`` command line.

Commands::

    radfusion demo [--out DIR] [--patients N] [--seed K]
    radfusion make-demo-cohort --out DIR [--patients N] [--sites S] [--seed K]
    radfusion train --config CFG --out RUN [--overwrite | --resume]
    torchrun --nproc_per_node N -m apps.cli train --config CFG --out RUN   # data-parallel (DDP)
    radfusion evaluate --run RUN
    radfusion inspect-image PATH [--json]
    radfusion score-pathways --expr FILE --gene-sets GMT [--method ssgsea|gsva] [--backend fast|gseapy] --out FILE
    radfusion explain --run RUN --patient ID [--out DIR] [--repeats N] [--cam gradcam|gradcampp|hirescam|integrated_gradients]
                     [--cam-layer auto|last|NAME]
    radfusion app --run RUN [--host 127.0.0.1] [--port 8501]

Bad input exits with status 2 and a one-line message naming the file, row,
patient and field; set ``RADFUSION_DEBUG=1`` to get the full traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


def _cmd_make_demo_cohort(args) -> int:
    from data_adapters.demo import make_demo_cohort

    t0 = time.time()
    manifest = make_demo_cohort(args.out, n_patients=args.patients, n_sites=args.sites, seed=args.seed,
                                n_workers=args.workers, progress=not args.quiet)
    print(f"demo cohort written: {manifest} ({time.time() - t0:.0f} s)")
    return 0


def _cmd_train(args) -> int:
    from fusion.config import load_config
    from fusion.experiment import run_experiment, summary_table

    cfg = load_config(args.config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _train_distributed(cfg, args)
    metrics = run_experiment(cfg, args.out, progress=not args.quiet, overwrite=args.overwrite, resume=args.resume)
    print(summary_table(metrics))
    print(f"\nrun folder: {args.out}")
    return 0


def _train_distributed(cfg, args) -> int:
    """``torchrun --nproc_per_node N -m apps.cli train ...``: data-parallel training (DDP).

    Every process reads the cohort and runs the same experiment; the models
    train with ``DistributedDataParallel`` (see :mod:`fusion.train`).  Rank 0
    writes the run folder; the other ranks write into a temporary folder that
    is removed at the end.
    """
    import shutil
    import tempfile

    import torch
    import torch.distributed as dist

    from fusion.experiment import run_experiment, summary_table

    if args.resume:
        raise ValueError("--resume is not supported for a distributed (torchrun) run; resume with one process "
                         "or start a fresh run folder")
    cuda = torch.cuda.is_available() and cfg.training.device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    scratch = None
    try:
        out = args.out
        if rank != 0:
            scratch = tempfile.mkdtemp(prefix=f"radfusion_rank{rank}_")
            out = Path(scratch) / "run"
        metrics = run_experiment(cfg, out, progress=rank == 0 and not args.quiet, overwrite=args.overwrite)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if rank == 0:
        print(summary_table(metrics))
        print(f"\nrun folder: {args.out} ({int(os.environ['WORLD_SIZE'])} processes)")
    return 0


def _cmd_evaluate(args) -> int:
    from fusion.experiment import evaluate_run, summary_table

    metrics = evaluate_run(args.run, progress=not args.quiet)
    print(summary_table(metrics))
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


def _cmd_demo(args) -> int:
    from data_adapters.demo import make_demo_cohort
    from fusion.config import default_config_dir, load_config
    from fusion.experiment import run_experiment, summary_table

    t0 = time.time()
    out = Path(args.out)
    cohort = out / "cohort"
    if not (cohort / "manifest.csv").exists():
        print(f"[1/2] generating the demo cohort ({args.patients} patients) in {cohort}")
        make_demo_cohort(cohort, n_patients=args.patients, n_sites=args.sites, seed=args.seed,
                         n_workers=args.workers, progress=not args.quiet)
    else:
        print(f"[1/2] using the existing demo cohort in {cohort}")
    cfg = load_config(default_config_dir() / "demo.yaml", overrides={"data": {"root": str(cohort.resolve())},
                                                                      "seed": args.seed})
    print(f"[2/2] training the fused model and the single-modality ablations into {out / 'run'}")
    metrics = run_experiment(cfg, out / "run", progress=not args.quiet, overwrite=True)
    print(summary_table(metrics))
    print(f"\nrun folder: {out / 'run'}   (total {time.time() - t0:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radfusion", description="Multimodal fusion models for survival with CT/PET/MR, "
                                "omics, EHR and clinical data.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="make the demo cohort (if absent), train and evaluate on it")
    d.add_argument("--out", default="radfusion_demo", help="output folder (cohort/ and run/ go inside)")
    d.add_argument("--patients", type=int, default=400)
    d.add_argument("--sites", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=2)
    d.set_defaults(func=_cmd_demo)

    m = sub.add_parser("make-demo-cohort", help="write a synthetic multimodal cohort with planted truth")
    m.add_argument("--out", required=True)
    m.add_argument("--patients", type=int, default=400)
    m.add_argument("--sites", type=int, default=4)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--workers", type=int, default=2)
    m.set_defaults(func=_cmd_make_demo_cohort)

    t = sub.add_parser("train", help="train and evaluate an experiment config into a run folder")
    t.add_argument("--config", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--overwrite", action="store_true", help="allow a non-empty run folder")
    t.add_argument("--resume", action="store_true",
                   help="continue a killed run in --out from its last completed epoch (same config required)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="re-evaluate a run folder from its checkpoints")
    e.add_argument("--run", required=True)
    e.add_argument("--json", action="store_true", help="also print metrics.json")
    e.set_defaults(func=_cmd_evaluate)

    from apps import app, explain, inspect_image, score_pathways

    inspect_image.add_parser(sub)
    score_pathways.add_parser(sub)
    explain.add_parser(sub)
    app.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from data_adapters.errors import InputError
    from fusion.config import ConfigError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (InputError, ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        if os.environ.get("RADFUSION_DEBUG"):
            raise
        print(f"radfusion {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
