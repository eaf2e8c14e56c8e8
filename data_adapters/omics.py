"""Expression matrices, gene sets and pathway scores.

Expression comes as AnnData (``.h5ad``, samples x genes) or a CSV/TSV table
with samples as rows and genes as columns (first column = sample ID).  Gene
sets come from GMT files.  Pathway scores are single-sample GSEA
(Barbie et al. 2009, Nature 462:108) computed with gseapy's ``ssgsea``; we
keep gseapy's raw per-sample enrichment score ``ES`` and *not* its ``NES``,
because gseapy's NES divides by the range of ES over all samples of the call,
which would make a test patient's score depend on the other patients (a
leak).  ES depends only on the sample's own expression ranks, so scoring is
leak-free by construction; the feature scaling applied afterwards is fitted on
the training fold only (see ``fusion.data``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from data_adapters.errors import InputError

log = logging.getLogger(__name__)


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Read a GMT file: ``name <TAB> description <TAB> gene ...`` per line.

    Gene symbols are upper-cased and de-duplicated within a set.  A line
    without genes, or a duplicated set name, is an error naming the line.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("gene-set file does not exist", file=path)
    sets: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            name = parts[0].strip()
            genes = [g.strip().upper() for g in parts[2:] if g.strip()]
            if not name:
                raise InputError(f"line {lineno} has no gene-set name", file=path, field="name")
            if not genes:
                raise InputError(f"gene set '{name}' on line {lineno} lists no genes", file=path, field=name)
            if name in sets:
                raise InputError(f"gene set '{name}' is defined twice (line {lineno})", file=path, field=name)
            sets[name] = list(dict.fromkeys(genes))
    if not sets:
        raise InputError("no gene sets found", file=path)
    return sets


def read_expression(path: str | Path):
    """Read an expression matrix into AnnData (obs = samples, var = genes).

    ``.h5ad`` files are read as they are; CSV/TSV tables must have samples as
    rows, the first column holding sample IDs and the other columns genes.
    Gene names are upper-cased; non-numeric or NaN cells are an error naming
    the sample and gene.
    """
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise InputError("expression file does not exist", file=path)
    if path.suffix == ".h5ad":
        try:
            adata = ad.read_h5ad(path)
        except Exception as err:  # h5py raises many types for a corrupt file
            raise InputError(f"cannot read AnnData: {err}", file=path) from None
    else:
        sep = "\t" if path.suffix in (".tsv", ".txt") else ","
        df = pd.read_csv(path, sep=sep, index_col=0)
        num = df.apply(pd.to_numeric, errors="coerce")
        bad = num.isna() & df.notna()
        if bad.to_numpy().any():
            r, c = np.argwhere(bad.to_numpy())[0]
            raise InputError(
                f"non-numeric value {df.iat[r, c]!r}", file=path, patient=str(df.index[r]), field=str(df.columns[c])
            )
        adata = ad.AnnData(X=num.to_numpy(dtype=np.float32), obs=pd.DataFrame(index=num.index.astype(str)),
                           var=pd.DataFrame(index=num.columns.astype(str)))
    adata.obs_names = adata.obs_names.astype(str)
    adata.var_names = pd.Index([str(g).upper() for g in adata.var_names])
    if adata.obs_names.duplicated().any():
        dup = adata.obs_names[adata.obs_names.duplicated()][0]
        raise InputError("duplicated sample ID", file=path, patient=str(dup), field="obs_names")
    if adata.var_names.duplicated().any():
        dup = adata.var_names[adata.var_names.duplicated()][0]
        raise InputError(
            "duplicated gene (after upper-casing); aggregate duplicated genes before scoring", file=path, field=str(dup)
        )
    X = _dense(adata.X)
    if not np.isfinite(X).all():
        r, c = np.argwhere(~np.isfinite(X))[0]
        raise InputError("NaN or infinite expression value", file=path, patient=str(adata.obs_names[r]),
                         field=str(adata.var_names[c]))
    return adata


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)


def looks_like_counts(X: np.ndarray) -> bool:
    """True when values are non-negative integers with a count-like range."""
    X = np.asarray(X)
    return bool((X >= 0).all() and np.allclose(X, np.round(X)) and X.max() > 50)


def log_cpm(X: np.ndarray) -> np.ndarray:
    """log1p of counts per million, per sample (row)."""
    X = np.asarray(X, dtype=np.float64)
    lib = X.sum(axis=1, keepdims=True)
    lib[lib == 0] = 1.0
    return np.log1p(X / lib * 1e6)


def filter_gene_sets(
    gene_sets: Mapping[str, list[str]], genes: pd.Index, *, min_size: int = 10, max_size: int = 500
) -> tuple[dict[str, list[str]], dict]:
    """Restrict sets to measured genes and drop sets outside [min_size, max_size].

    Returns the kept sets and a report: the dropped sets with their overlap
    size, how many members each set lost, and how many measured genes are in
    no set.
    """
    gene_index = set(genes)
    kept, dropped, lost = {}, {}, {}
    for name, members in gene_sets.items():
        present = [g for g in members if g in gene_index]
        lost[name] = len(members) - len(present)
        if min_size <= len(present) <= max_size:
            kept[name] = present
        else:
            dropped[name] = len(present)
    in_any = set().union(*kept.values()) if kept else set()
    report = {
        "n_sets_in": len(gene_sets),
        "n_sets_kept": len(kept),
        "dropped_sets": dropped,
        "members_missing_per_set": {k: v for k, v in lost.items() if v},
        "n_genes_measured": len(gene_index),
        "n_genes_in_no_set": len(gene_index - in_any),
    }
    if not kept:
        raise InputError(
            f"no gene set keeps between {min_size} and {max_size} measured genes "
            "(do the gene identifiers of the expression matrix and the GMT file match?)",
            field="gene_sets",
        )
    return kept, report


def score_pathways(
    adata,
    gene_sets: Mapping[str, list[str]],
    *,
    method: str = "ssgsea",
    layer: str | None = None,
    key_added: str = "pathway_scores",
    min_size: int = 10,
    max_size: int = 500,
    threads: int = 1,
    copy: bool = False,
):
    """Per-sample pathway scores, scanpy-style.

    Parameters
    ----------
    adata
        AnnData, samples x genes (counts or log values: ssGSEA uses
        within-sample ranks only).
    gene_sets
        Mapping set name -> gene symbols.
    method
        ``"ssgsea"`` (gseapy, ``sample_norm_method="rank"``, no permutations,
        weight 0.25; raw ES per sample).
    layer
        Use ``adata.layers[layer]`` instead of ``adata.X``.
    key_added
        Scores (samples x sets, float32) go to ``adata.obsm[key_added]`` as a
        DataFrame; parameters and the gene-set report to
        ``adata.uns[key_added]``.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    AnnData or None
    """
    import gseapy

    if method != "ssgsea":
        raise ValueError(f"method must be 'ssgsea', got {method!r}")
    adata = adata.copy() if copy else adata
    X = _dense(adata.layers[layer] if layer is not None else adata.X)
    kept, report = filter_gene_sets(gene_sets, adata.var_names, min_size=min_size, max_size=max_size)
    expr = pd.DataFrame(X.T, index=adata.var_names, columns=adata.obs_names)
    res = gseapy.ssgsea(
        data=expr,
        gene_sets=kept,
        sample_norm_method="rank",
        correl_norm_type="rank",
        permutation_num=0,
        weight=0.25,
        min_size=min_size,
        max_size=max_size,
        outdir=None,
        threads=threads,
        no_plot=True,
        verbose=False,
    )
    es = res.res2d.pivot(index="Name", columns="Term", values="ES").astype(np.float64)
    es = es.reindex(index=adata.obs_names, columns=sorted(kept))
    adata.obsm[key_added] = es.astype(np.float32)
    adata.uns[key_added] = {
        "params": {"method": method, "layer": layer, "min_size": min_size, "max_size": max_size,
                   "sample_norm_method": "rank", "weight": 0.25, "score": "ES (per-sample, not NES)"},
        "report": report,
    }
    return adata if copy else None


def pathway_scores_for_cohort(
    expression_path: str | Path,
    gmt_path: str | Path,
    patient_ids: list[str],
    *,
    min_size: int = 10,
    max_size: int = 500,
) -> tuple[pd.DataFrame, dict]:
    """Pathway scores (patients x sets) for the manifest's patients.

    Patients absent from the expression file get a row of NaN (their omics
    modality is absent); samples in the expression file that are not in the
    manifest are ignored.  Both are counted in the returned report.
    """
    adata = read_expression(expression_path)
    gene_sets = read_gmt(gmt_path)
    X = _dense(adata.X)
    if (X < 0).any() and looks_like_counts(np.abs(X)):
        raise InputError("negative values in what looks like a count matrix", file=expression_path, field="X")
    counts = looks_like_counts(X)
    if counts:
        adata.layers["log_cpm"] = log_cpm(X).astype(np.float32)
    pids = set(patient_ids)
    in_manifest = [s for s in adata.obs_names if s in pids]
    extra = [s for s in adata.obs_names if s not in pids]
    sub = adata[in_manifest].copy()
    try:
        score_pathways(sub, gene_sets, layer="log_cpm" if counts else None, min_size=min_size, max_size=max_size)
    except InputError as err:
        raise InputError(err.message, file=f"{expression_path} + {gmt_path}", field="gene_sets") from None
    scores = sub.obsm["pathway_scores"].reindex(patient_ids)
    report = dict(sub.uns["pathway_scores"]["report"])
    report.update(
        input_was_counts=counts,
        n_samples_in_file=int(adata.n_obs),
        n_samples_not_in_manifest=len(extra),
        n_patients_without_expression=int(scores.isna().all(axis=1).sum()),
    )
    return scores, report
