"""``radfusion score-pathways``: pathway scores of an expression matrix.

::

    radfusion score-pathways --expr FILE --gene-sets GMT [--method ssgsea|gsva]
                             [--backend fast|gseapy] [--kcdf Gaussian|Poisson|auto]
                             [--min-size N] [--max-size N]
                             [--orientation auto|samples_x_genes|genes_x_samples]
                             [--adapter NAME] --out FILE.csv|FILE.h5ad

``--out`` ending in ``.csv``: one row per sample, first column ``sample``,
one column per kept gene set.  Ending in ``.h5ad``: the expression AnnData
with the scores in ``obsm["pathway_scores"]`` and the parameters and
gene-set report in ``uns["pathway_scores"]``.  A one-line JSON summary of
what was read, merged, dropped and scored is printed to stdout.

GSVA needs a reference set of samples for its kernel CDFs; a command line
has no train/test split, so it fits them on *all* samples of the file (and
says so).  In cross-validation use ``data_adapters.omics.GSVAScorer`` fitted
on the training fold.  Bad input exits with status 2 and the error message.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``score-pathways`` sub-command on an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser("score-pathways", help="ssGSEA / GSVA pathway scores of an expression matrix",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--expr", required=True, help="expression matrix (.h5ad, .csv, .tsv, .parquet, or a plug-in)")
    p.add_argument("--gene-sets", required=True, help="gene sets (.gmt or a registered gene-set source)")
    p.add_argument("--method", choices=("ssgsea", "gsva"), default="ssgsea")
    p.add_argument("--backend", choices=("fast", "gseapy"), default="fast",
                   help="fast = radfusion's vectorised implementation, gseapy = reference")
    p.add_argument("--kcdf", choices=("Gaussian", "Poisson", "auto"), default="auto",
                   help="GSVA kernel (auto: Poisson for raw counts, else Gaussian)")
    p.add_argument("--min-size", type=int, default=10, help="minimum measured genes per set")
    p.add_argument("--max-size", type=int, default=500, help="maximum measured genes per set")
    p.add_argument("--orientation", choices=("auto", "samples_x_genes", "genes_x_samples"), default="auto")
    p.add_argument("--adapter", default=None, help="omics adapter name (default: by file suffix)")
    p.add_argument("--gene-set-source", default=None, help="gene-set source name (default: by file suffix)")
    p.add_argument("--out", required=True, help="output .csv or .h5ad")
    p.set_defaults(func=run)
    return p


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None:
        return "None"
    if hasattr(x, "item"):
        return x.item()
    return x


def run(args: argparse.Namespace) -> int:
    """Execute ``score-pathways``; returns the exit status (0, or 2 on bad input)."""
    from data_adapters.errors import InputError

    try:
        return _run(args)
    except (InputError, ValueError, FileNotFoundError) as err:
        if os.environ.get("RADFUSION_DEBUG"):
            raise
        print(f"radfusion score-pathways: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from data_adapters.errors import InputError
    from data_adapters.omics import read_expression, read_gene_sets, score_pathways

    out = Path(args.out)
    if out.suffix not in (".csv", ".h5ad"):
        raise InputError("output must end in .csv or .h5ad", file=out, field="--out")
    adata = read_expression(args.expr, orientation=getattr(args, "orientation", "auto"),
                            adapter=getattr(args, "adapter", None))
    sets = read_gene_sets(args.gene_sets, source=getattr(args, "gene_set_source", None))
    method = getattr(args, "method", "ssgsea")
    kcdf = getattr(args, "kcdf", "auto")
    if method == "gsva" and kcdf == "auto":
        kcdf = "Poisson" if adata.uns["expression_report"]["value_type"] == "counts" else "Gaussian"
    score_pathways(adata, sets, method=method, backend=getattr(args, "backend", "fast"),
                   min_size=getattr(args, "min_size", 10), max_size=getattr(args, "max_size", 500), kcdf=kcdf)
    scores = adata.obsm["pathway_scores"]
    rep = adata.uns["pathway_scores"]["report"]
    erep = adata.uns["expression_report"]
    summary = {
        "samples": int(adata.n_obs),
        "genes": int(adata.n_vars),
        "orientation": erep.get("orientation"),
        "value_type": erep.get("value_type"),
        "duplicated_genes_merged": erep.get("n_duplicated_genes", 0),
        "gene_sets_in": rep["n_sets_in"],
        "gene_sets_scored": rep["n_sets_kept"],
        "gene_sets_dropped": len(rep["dropped_sets"]),
        "measured_genes_in_no_set": rep["n_genes_in_no_set"],
    }
    if method == "gsva":
        print(f"note: GSVA kernel CDFs ({kcdf}) were fitted on all {adata.n_obs} samples of {args.expr} "
              "(no train/test split on the command line); in cross-validation fit GSVAScorer on the training fold")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        df = scores.astype(np.float64).copy()
        df.index.name = "sample"
        df.to_csv(out)
    else:
        adata.uns["pathway_scores"] = _jsonable(adata.uns["pathway_scores"])
        adata.uns["expression_report"] = _jsonable(erep)
        adata.write_h5ad(out)
    print(json.dumps(summary))
    print(f"wrote {scores.shape[1]} pathway scores for {scores.shape[0]} samples to {out}")
    return 0
