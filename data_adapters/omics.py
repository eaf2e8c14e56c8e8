"""Expression matrices, gene sets and pathway scores.

Reading
-------
:func:`read_expression` reads ``.h5ad`` (AnnData: obs = samples, var = genes),
CSV/TSV (optionally gzipped) and Parquet tables in either orientation, or any
format of a registered plug-in adapter (:mod:`data_adapters.omics_plugins`).
A table is samples x genes (first column = sample ID) unless it is detected,
or declared with ``orientation="genes_x_samples"``, to be genes x samples.
Gene identifiers are harmonised (:func:`harmonise_gene_ids`: upper-case,
Ensembl version suffixes removed), duplicated genes are aggregated by a
documented rule (:func:`aggregate_duplicate_genes`) and the value type (raw
counts, log values, linear intensities, signed values) is detected
(:func:`detect_value_type`).  Everything done is reported in
``adata.uns["expression_report"]``.

Scoring
-------
``ssgsea`` (Barbie et al. 2009, Nature 462:108) is computed per sample by a
vectorised implementation (:func:`ssgsea_es`, numpy, or torch on a CUDA
device) that reproduces gseapy's ``ssgsea(sample_norm_method="rank",
permutation_num=0)`` raw ``ES`` exactly; gseapy stays available as
``backend="gseapy"``.  We keep the raw per-sample ES and *not* gseapy's
``NES``, which divides by the range of ES over all samples of the call and
would make a test patient's score depend on the other patients (a leak).

``gsva`` (Hänzelmann, Castelo & Guinney 2013, BMC Bioinformatics 14:7)
estimates each gene's cumulative distribution across samples with a kernel;
:class:`GSVAScorer` fits those kernel CDFs on *training* samples only and
applies them to any sample, so a held-out sample's score depends only on the
training samples and itself.  Fitted on all samples and applied to the same
samples it reproduces gseapy's GSVA (see ``tests/data_adapters/test_omics_fast.py``).

:class:`PathwayScorer` chains the fold-level steps (optional ComBat, then
ssGSEA or GSVA) as one fit/transform object for cross-validation.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from data_adapters.errors import InputError
from data_adapters.omics_plugins import (
    adapter_for_path,
    gene_set_source_for_path,
    get_gene_set_source,
    get_omics_adapter,
    register_gene_set_source,
    register_omics_adapter,
)

log = logging.getLogger(__name__)

ORIENTATIONS = ("auto", "samples_x_genes", "genes_x_samples")
DUPLICATE_RULES = ("aggregate", "sum", "mean", "max", "first", "error")
METHODS = ("ssgsea", "gsva")
BACKENDS = ("fast", "gseapy")

_ENSEMBL = re.compile(r"^(ENS[A-Z]*[GTPE]\d{6,})(\.\d+)?(_PAR_Y)?$")
_SYMBOL = re.compile(r"^[A-Z][A-Z0-9._\-/@]*$")


# ---------------------------------------------------------------- gene sets
@register_gene_set_source("gmt", suffixes=(".gmt",))
def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Read a GMT file: ``name <TAB> description <TAB> gene ...`` per line.

    Gene identifiers are harmonised like the expression matrix's
    (:func:`harmonise_gene_ids`: upper-case, Ensembl version removed) and
    de-duplicated within a set.  A line without genes, or a duplicated set
    name, is an error naming the line.
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
            genes = [_harmonise_one(g) for g in parts[2:] if g.strip()]
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


def read_gene_sets(path_or_name: str | Path, *, source: str | None = None, **kwargs) -> dict[str, list[str]]:
    """Gene sets from a registered source (by ``source`` name or the file suffix, default GMT)."""
    name = source or gene_set_source_for_path(path_or_name) or "gmt"
    sets = get_gene_set_source(name)(path_or_name, **kwargs)
    if not isinstance(sets, Mapping) or not sets:
        raise InputError(f"gene-set source {name!r} returned no gene sets", file=path_or_name)
    return {str(k): list(dict.fromkeys(_harmonise_one(g) for g in v)) for k, v in sets.items()}


def filter_gene_sets(
    gene_sets: Mapping[str, Sequence[str]], genes: pd.Index, *, min_size: int = 10, max_size: int = 500
) -> tuple[dict[str, list[str]], dict]:
    """Restrict sets to measured genes and drop sets outside [min_size, max_size].

    A set that would contain every measured gene is dropped too (its
    enrichment score is undefined).

    Returns
    -------
    kept
        Set name -> measured member genes, in the set's order.
    report
        ``dropped_sets`` (name -> number of measured members), how many
        members each set lost (``members_missing_per_set``), how many set
        genes are not measured (``n_set_genes_not_measured``, with up to 20
        examples), and how many measured genes are in no kept set
        (``n_genes_in_no_set``).
    """
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    gene_index = set(genes)
    kept, dropped, lost = {}, {}, {}
    all_set_genes: set[str] = set()
    for name, members in gene_sets.items():
        all_set_genes.update(members)
        present = [g for g in members if g in gene_index]
        lost[name] = len(members) - len(present)
        if min_size <= len(present) <= max_size and len(present) < len(gene_index):
            kept[name] = present
        else:
            dropped[name] = len(present)
    in_any = set().union(*kept.values()) if kept else set()
    absent = sorted(all_set_genes - gene_index)
    report = {
        "n_sets_in": len(gene_sets),
        "n_sets_kept": len(kept),
        "min_size": int(min_size),
        "max_size": int(max_size),
        "dropped_sets": dropped,
        "members_missing_per_set": {k: v for k, v in lost.items() if v},
        "n_set_genes_not_measured": len(absent),
        "set_genes_not_measured_examples": absent[:20],
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


# ------------------------------------------------------ gene identifiers
def _harmonise_one(g) -> str:
    s = str(g).strip().upper()
    m = _ENSEMBL.match(s)
    if m:
        return m.group(1) + (m.group(3) or "")
    return s


def harmonise_gene_ids(names: Sequence) -> tuple[pd.Index, dict]:
    """Harmonise gene identifiers: strip, upper-case, drop Ensembl versions.

    ``"tp53 "`` -> ``"TP53"``; ``"ENSG00000141510.17"`` -> ``"ENSG00000141510"``
    (GENCODE's ``_PAR_Y`` suffix is kept: ``ENSG00000002586.20_PAR_Y`` ->
    ``ENSG00000002586_PAR_Y``).  Returns the new index and a report with the
    number of identifiers changed by each rule.
    """
    out, n_case, n_version = [], 0, 0
    for g in names:
        raw = str(g).strip()
        up = raw.upper()
        new = _harmonise_one(raw)
        n_case += int(up != raw)
        n_version += int(new != up)
        out.append(new)
    if any(not g or g in ("NAN", "NONE") for g in out):
        i = next(i for i, g in enumerate(out) if not g or g in ("NAN", "NONE"))
        raise InputError(f"gene identifier #{i + 1} is empty", field="var_names")
    report = {"n_gene_ids_upper_cased": n_case, "n_ensembl_versions_stripped": n_version}
    return pd.Index(out, dtype=object), report


def _label_kind(ids: Sequence) -> tuple[float, float, bool]:
    """(fraction Ensembl IDs, fraction symbol-like, numbered series?) of a set of labels.

    A numbered series is one prefix + a running number for most labels
    (``S1, S2 ...``, ``PT001 ...``, ``GENE1 ...``): typical of sample IDs and
    of synthetic gene names, so it cannot tell genes from samples.
    """
    ids = [str(i).strip().upper() for i in ids][:2000]
    if not ids:
        return 0.0, 0.0, False
    ens = float(np.mean([bool(_ENSEMBL.match(i)) for i in ids]))
    sym = float(np.mean([bool(_SYMBOL.match(i)) for i in ids]))
    stems = pd.Series([re.sub(r"[\d_\-.]+$", "", i) or i for i in ids])
    numbered = len(ids) > 3 and stems.value_counts(normalize=True).iloc[0] > 0.5
    return ens, sym, bool(numbered)


def detect_orientation(index: Sequence, columns: Sequence) -> tuple[str, str]:
    """Guess whether a table is samples x genes or genes x samples.

    Rules, in order: Ensembl IDs on the columns -> samples x genes; Ensembl
    IDs on the rows -> genes x samples.  Otherwise genes are taken to be rows
    when there are at least twice as many rows as columns, the row labels
    look like gene symbols and the column labels do not (a numbered series
    such as ``S1, S2 ...`` does not count as symbols), or the row labels look
    like symbols and the column labels are not identifiers at all.  When both
    axes are numbered series the table is ambiguous and read as samples x
    genes (the data contract's default), as is anything else.  Returns
    ``(orientation, reason)``; pass ``orientation=`` to the readers to
    override.
    """
    n_rows, n_cols = len(index), len(columns)
    ens_r, sym_r, num_r = _label_kind(index)
    ens_c, sym_c, num_c = _label_kind(columns)
    if ens_c >= 0.5:
        return "samples_x_genes", "column labels are Ensembl gene IDs"
    if ens_r >= 0.5:
        return "genes_x_samples", "row labels are Ensembl gene IDs"
    tall = n_rows >= 2 * n_cols
    rows_symbols = sym_r >= 0.8
    cols_genes = sym_c >= 0.8 and not num_c
    if tall and rows_symbols and not num_r and not cols_genes:
        return "genes_x_samples", (f"row labels look like gene symbols, column labels do not, and there are "
                                   f"{n_rows} rows vs {n_cols} columns")
    if tall and rows_symbols and sym_c < 0.8:
        return "genes_x_samples", (f"row labels look like identifiers, column labels do not, and there are "
                                   f"{n_rows} rows vs {n_cols} columns")
    if tall and rows_symbols and num_r and num_c:
        return "samples_x_genes", ("ambiguous (row and column labels are both numbered series); read as samples x "
                                   "genes, set orientation= to be sure")
    return "samples_x_genes", "default (column labels are genes)"


# ------------------------------------------------------------ value types
def expression_matrix(adata, layer: str | None = None) -> np.ndarray:
    """Dense float64 samples x genes matrix of ``adata.X`` or ``adata.layers[layer]``.

    A missing layer or a NaN/infinite value is an :class:`InputError` naming the
    sample and gene.
    """
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} not found", field=layer)
    X = _dense(adata.layers[layer] if layer is not None else adata.X)
    if not np.isfinite(X).all():
        r, c = np.argwhere(~np.isfinite(X))[0]
        raise InputError("NaN or infinite expression value", patient=str(adata.obs_names[r]),
                         field=str(adata.var_names[c]))
    return X


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)


def detect_value_type(X) -> str:
    """Classify an expression matrix by its values.

    Returns
    -------
    str
        ``"counts"``: non-negative integers with a maximum above 1 (raw
        read/UMI counts); ``"log"``: non-negative, not all integers, maximum
        <= 50 (log-normalised values: log1p CPM, log2 intensities);
        ``"linear"``: non-negative, not all integers, maximum > 50 (TPM, FPKM,
        linear intensities); ``"signed"``: contains negative values (z-scores,
        log ratios, scaled data).
    """
    X = _dense(X)
    finite = X[np.isfinite(X)]
    if finite.size == 0:
        return "log"
    if (finite < 0).any():
        return "signed"
    mx = float(finite.max())
    if np.allclose(finite, np.round(finite), atol=1e-6) and mx > 1:
        return "counts"
    return "log" if mx <= 50 else "linear"


def looks_like_counts(X) -> bool:
    """True when values are non-negative integers with a count-like range (see :func:`detect_value_type`)."""
    return detect_value_type(X) == "counts"


def log_cpm(X: np.ndarray) -> np.ndarray:
    """log1p of counts per million, per sample (row)."""
    X = np.asarray(X, dtype=np.float64)
    lib = X.sum(axis=1, keepdims=True)
    lib[lib == 0] = 1.0
    return np.log1p(X / lib * 1e6)


def aggregate_duplicate_genes(adata, *, rule: str = "aggregate", value_type: str | None = None,
                              file=None) -> tuple[object, dict]:
    """Merge columns of ``adata`` that share a gene identifier.

    Parameters
    ----------
    adata
        AnnData, samples x genes (identifiers already harmonised).
    rule
        ``"aggregate"`` (default): ``"sum"`` for counts and linear values
        (transcripts or probes of one gene add up), ``"mean"`` for log and
        signed values (a sum of logs would be a product); or one of ``"sum"``,
        ``"mean"``, ``"max"``, ``"first"``, or ``"error"`` to refuse
        duplicates.
    value_type
        From :func:`detect_value_type`; computed when not given.

    Returns
    -------
    adata, report
        A new AnnData when duplicates were merged (``var`` keeps the first
        occurrence's annotation) and a report: ``n_duplicated_genes``,
        ``n_columns_merged``, ``duplicate_rule`` and up to 50
        ``duplicated_genes`` (gene -> number of columns).
    """
    import anndata as ad

    if rule not in DUPLICATE_RULES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_RULES}, got {rule!r}")
    names = pd.Index(adata.var_names)
    dup_mask = names.duplicated(keep=False)
    report = {"n_duplicated_genes": 0, "n_columns_merged": 0, "duplicate_rule": None, "duplicated_genes": {}}
    if not dup_mask.any():
        return adata, report
    counts = pd.Series(names[dup_mask]).value_counts()
    if rule == "error":
        raise InputError("duplicated gene (after harmonising identifiers); aggregate duplicated genes before "
                         "scoring or pass duplicates='aggregate'", file=file, field=str(counts.index[0]))
    if rule == "aggregate":
        value_type = value_type or detect_value_type(adata.X)
        rule = "sum" if value_type in ("counts", "linear") else "mean"
    codes, uniques = pd.factorize(names)
    X = _dense(adata.X)
    df = pd.DataFrame(X.T)
    grouped = df.groupby(codes, sort=True)
    agg = {"sum": grouped.sum, "mean": grouped.mean, "max": grouped.max, "first": grouped.first}[rule]()
    first_pos = pd.Series(np.arange(len(names))).groupby(codes).first().to_numpy()
    var = adata.var.iloc[first_pos].copy()
    var.index = pd.Index(uniques, dtype=object)
    out = ad.AnnData(X=agg.to_numpy().T.astype(np.float32), obs=adata.obs.copy(), var=var)
    out.uns.update(adata.uns)
    report.update(
        n_duplicated_genes=int(len(counts)),
        n_columns_merged=int(counts.sum() - len(counts)),
        duplicate_rule=rule,
        duplicated_genes={str(k): int(v) for k, v in counts.head(50).items()},
    )
    return out, report


# ------------------------------------------------------------------ readers
def _table_to_frame(df: pd.DataFrame, path: Path, orientation: str) -> tuple[pd.DataFrame, str, str]:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise InputError("expression table is empty", file=path)
    if orientation == "auto":
        orientation, reason = detect_orientation(df.index, df.columns)
    else:
        reason = "set explicitly"
    if orientation == "genes_x_samples":
        df = df.T
    num = df.apply(pd.to_numeric, errors="coerce")
    bad = num.isna() & df.notna()
    if bad.to_numpy().any():
        r, c = np.argwhere(bad.to_numpy())[0]
        raise InputError(
            f"non-numeric value {df.iat[r, c]!r} (table read as {orientation.replace('_', ' ')})",
            file=path, patient=str(df.index[r]), field=str(df.columns[c]))
    return num, orientation, reason


def _frame_to_adata(num: pd.DataFrame):
    import anndata as ad

    return ad.AnnData(X=num.to_numpy(dtype=np.float32), obs=pd.DataFrame(index=num.index.astype(str)),
                      var=pd.DataFrame(index=pd.Index([str(c) for c in num.columns], dtype=object)))


@register_omics_adapter("csv", suffixes=(".csv",))
def _read_csv(path, *, orientation: str = "auto", sep: str = ","):
    """CSV table, first column = sample IDs (or gene IDs when genes x samples)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, sep=sep, index_col=0)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise InputError(f"cannot parse table: {err}", file=path) from None
    num, orientation, reason = _table_to_frame(df, path, orientation)
    adata = _frame_to_adata(num)
    adata.uns["_orientation"] = {"orientation": orientation, "reason": reason}
    return adata


@register_omics_adapter("tsv", suffixes=(".tsv", ".txt", ".tab"))
def _read_tsv(path, *, orientation: str = "auto"):
    """Tab-separated table (``.tsv``, ``.txt``), first column = IDs."""
    return _read_csv(path, orientation=orientation, sep="\t")


@register_omics_adapter("parquet", suffixes=(".parquet", ".pq"))
def _read_parquet(path, *, orientation: str = "auto"):
    """Parquet table; the index (or, with a default index, the first text column) holds the IDs."""
    path = Path(path)
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises many types for a corrupt file
        raise InputError(f"cannot read Parquet: {err}", file=path) from None
    if isinstance(df.index, pd.RangeIndex) and df.shape[1] > 0 and not pd.api.types.is_numeric_dtype(df.iloc[:, 0]):
        df = df.set_index(df.columns[0])
    num, orientation, reason = _table_to_frame(df, path, orientation)
    adata = _frame_to_adata(num)
    adata.uns["_orientation"] = {"orientation": orientation, "reason": reason}
    return adata


@register_omics_adapter("h5ad", suffixes=(".h5ad",))
def _read_h5ad(path, *, orientation: str = "auto"):
    """AnnData file (obs = samples, var = genes); ``orientation="genes_x_samples"`` transposes it."""
    import anndata as ad

    path = Path(path)
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py raises many types for a corrupt file
        raise InputError(f"cannot read AnnData: {err}", file=path) from None
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if orientation == "genes_x_samples":
        adata = adata.T.copy()
    adata.uns["_orientation"] = {
        "orientation": "samples_x_genes" if orientation != "genes_x_samples" else "genes_x_samples",
        "reason": "AnnData convention (obs = samples)" if orientation == "auto" else "set explicitly"}
    return adata


def read_expression(path: str | Path, *, orientation: str = "auto", adapter: str | None = None,
                    duplicates: str = "aggregate", **adapter_kwargs):
    """Read an expression matrix into AnnData (obs = samples, var = genes).

    Parameters
    ----------
    path
        ``.h5ad``, ``.csv``/``.csv.gz``, ``.tsv``/``.txt``, ``.parquet``, or a
        suffix registered by a plug-in adapter.
    orientation
        ``"auto"`` (:func:`detect_orientation` for tables; AnnData files are
        taken as they are), ``"samples_x_genes"`` or ``"genes_x_samples"``.
    adapter
        Name of a registered adapter (:func:`data_adapters.omics_plugins.list_omics_adapters`);
        default: chosen by the file suffix.
    duplicates
        Rule for genes that occur more than once after harmonisation (see
        :func:`aggregate_duplicate_genes`; ``"error"`` refuses them).
    **adapter_kwargs
        Passed on to the adapter.

    Returns
    -------
    AnnData
        ``X`` float32 (dense), gene identifiers harmonised
        (:func:`harmonise_gene_ids`), and ``uns["expression_report"]``:
        file, adapter, orientation (+ reason), value type, identifier
        changes and duplicate handling.

    Raises
    ------
    InputError
        Missing/unreadable file, non-numeric or non-finite value (naming the
        sample and gene), duplicated sample ID, duplicated gene with
        ``duplicates="error"``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("expression file does not exist", file=path)
    name = adapter or adapter_for_path(path)
    if name is None:
        raise InputError(f"no omics adapter for suffix {''.join(path.suffixes) or '(none)'!r}; pass adapter= "
                         "(see data_adapters.omics_plugins.list_omics_adapters())", file=path)
    fn = get_omics_adapter(name)
    if name in ("csv", "tsv", "parquet", "h5ad"):
        adapter_kwargs["orientation"] = orientation
    elif orientation != "auto":
        adapter_kwargs["orientation"] = orientation
    adata = fn(path, **adapter_kwargs)
    if not hasattr(adata, "obs_names") or not hasattr(adata, "var_names"):
        raise InputError(f"omics adapter {name!r} returned {type(adata).__name__}, expected AnnData", file=path)
    orient = adata.uns.pop("_orientation", {"orientation": "samples_x_genes", "reason": f"adapter {name!r}"})
    return _finalise_expression(adata, path=path, duplicates=duplicates,
                                report={"file": str(path), "adapter": name, **orient})


def _finalise_expression(adata, *, path=None, duplicates: str = "aggregate", report: dict | None = None):
    """Shared checks: sample IDs, gene-ID harmonisation, finite values, value type, duplicates."""
    report = dict(report or {})
    adata.obs_names = pd.Index([str(s) for s in adata.obs_names], dtype=object)
    if adata.obs_names.duplicated().any():
        dup = adata.obs_names[adata.obs_names.duplicated()][0]
        raise InputError("duplicated sample ID", file=path, patient=str(dup), field="obs_names")
    new_names, id_report = harmonise_gene_ids(adata.var_names)
    adata.var_names = new_names
    X = _dense(adata.X)
    if not np.isfinite(X).all():
        r, c = np.argwhere(~np.isfinite(X))[0]
        raise InputError("NaN or infinite expression value", file=path, patient=str(adata.obs_names[r]),
                         field=str(adata.var_names[c]))
    vtype = detect_value_type(X)
    adata.X = X.astype(np.float32)
    adata, dup_report = aggregate_duplicate_genes(adata, rule=duplicates, value_type=vtype, file=path)
    report.update(id_report)
    report.update(dup_report)
    report.update(value_type=vtype, n_samples=int(adata.n_obs), n_genes=int(adata.n_vars))
    if dup_report["n_duplicated_genes"]:
        log.info("%s: %d duplicated genes merged by %s", path, dup_report["n_duplicated_genes"],
                 dup_report["duplicate_rule"])
    adata.uns["expression_report"] = report
    return adata


# ------------------------------------------------------------- fast ssGSEA
def _membership(gene_names: pd.Index, gene_sets: Mapping[str, Sequence[str]]):
    """Sparse (G, K) 0/1 membership matrix and the set sizes."""
    from scipy import sparse

    pos = {g: i for i, g in enumerate(gene_names)}
    rows, cols = [], []
    for k, members in enumerate(gene_sets.values()):
        idx = sorted({pos[g] for g in members if g in pos})
        rows.extend(idx)
        cols.extend([k] * len(idx))
    M = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(gene_names), len(gene_sets)))
    return M, np.asarray(M.sum(axis=0)).ravel()


def _stable_order_and_ranks(Xc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise stable ascending order, and the average ranks of tied values.

    Returns ``order`` (S, N) integer (ties keep gene order, as a stable
    sort), ``tie_idx``: flat positions (into the sorted ``(S, N)`` array) of
    values that have a tie, and ``tie_r2``: twice their 1-based average rank
    (ties share their mean rank).  Every other sorted position ``j`` has rank
    ``j + 1``.

    When the values are exactly representable in float32 (AnnData's default
    dtype) each value's order-preserving 32-bit pattern is packed with the
    gene index into one int64 key, and a single (SIMD) integer sort yields the
    stable order.  Otherwise an unstable float64 argsort is used and ties are
    made stable by sorting the unique keys ``tie_group * N + gene_index``.
    """
    S, N = Xc.shape
    Xc = np.ascontiguousarray(Xc)
    x32 = np.ascontiguousarray(Xc + 0.0, dtype=np.float32)  # + 0.0 turns -0.0 into 0.0
    if N < 2**31 and np.array_equal(x32, Xc):
        b = x32.view(np.uint32)
        # order-preserving map of IEEE-754 float32 to uint32: flip every bit of a
        # negative value, only the sign bit of the others
        flip = b >> np.uint32(31)
        np.negative(flip, out=flip)
        flip |= np.uint32(2**31)
        key = (b ^ flip).astype(np.uint64)
        key <<= np.uint64(32)
        key |= np.arange(N, dtype=np.uint64)[None, :]
        key.sort(axis=1)
        words = key.view(np.uint32).reshape(S, N, 2)
        lo, hi = (0, 1) if np.little_endian else (1, 0)
        o = words[:, :, lo]
        v = words[:, :, hi]
        new = np.empty((S, N), dtype=bool)
        new[:, 0] = True
        np.not_equal(v[:, 1:], v[:, :-1], out=new[:, 1:])
    else:
        o = np.argsort(Xc, axis=1)
        xs = np.take_along_axis(Xc, o, axis=1)
        new = np.empty(xs.shape, dtype=bool)
        new[:, 0] = True
        np.not_equal(xs[:, 1:], xs[:, :-1], out=new[:, 1:])
        if not new.all():
            key = np.cumsum(new, axis=1, dtype=np.int64)
            key -= 1
            key *= N
            key += o
            key.sort(axis=1)
            o = key % N
    # average ranks differ from j + 1 only inside tie groups: compute them there only
    nf = new.ravel()
    in_tie = ~nf
    in_tie[:-1] |= ~nf[1:]
    idx = np.flatnonzero(in_tie)
    if idx.size == 0:
        return o, idx, idx
    gpos = np.flatnonzero(nf[idx])  # group starts, as positions in idx
    sizes = np.diff(np.append(gpos, idx.size))
    starts = idx[gpos]
    local = starts - (starts // N) * N
    return o, idx, np.repeat(2 * local + sizes + 1, sizes)


def ssgsea_es(X, gene_names: Sequence[str], gene_sets: Mapping[str, Sequence[str]], *, weight: float = 0.25,
              chunk_size: int = 16, device: str | None = None, n_jobs: int = 1) -> np.ndarray:
    """Raw single-sample GSEA enrichment scores, vectorised.

    Implements ssGSEA (Barbie et al. 2009, Nature 462:108, Suppl. Methods)
    exactly as gseapy does with ``sample_norm_method="rank"``,
    ``correl_norm_type="rank"``, ``permutation_num=0``.  For a sample with
    ``N`` genes, each gene's value is replaced by ``r = 10000 * rank / N``
    (average rank for ties) and genes are ordered by decreasing value (ties:
    the later gene first, as gseapy's stable sort reversed).  With ``p_i`` the
    0-based position of member ``i`` of a set ``S`` of size ``k`` in that order
    and ``w_i = r_i ** weight``, the score is the sum over positions of the
    running-sum random walk, in closed form::

        ES = sum_i w_i (N - p_i) / sum_i w_i  -  (N (N + 1) / 2 - sum_i (N - p_i)) / (N - k)

    Everything is a per-sample sort plus three sparse matrix products, so the
    cost is ``O(S N log N + S * nnz(membership))``.

    Parameters
    ----------
    X
        ``(S, N)`` expression, samples x genes (any monotone scale: only
        within-sample ranks matter).
    gene_names
        ``(N,)`` identifiers of ``X``'s columns.
    gene_sets
        Set name -> member identifiers (members not in ``gene_names`` are
        ignored; filter first with :func:`filter_gene_sets`).
    weight
        Exponent of the rank weights (0.25 in Barbie et al.).
    chunk_size
        Samples per chunk; peak memory is about ``n_jobs x 8 x chunk x N x 8`` bytes.
    n_jobs
        Threads working on chunks (numpy backend); results do not depend on it.
    device
        ``None``/``"cpu"``: numpy.  A torch device string (``"cuda"``,
        ``"cuda:0"``, ``"cpu-torch"`` for torch on CPU): torch.

    Returns
    -------
    ndarray
        ``(S, K)`` float64 ES, columns in ``gene_sets`` order.
    """
    X = np.ascontiguousarray(_dense(X))
    S, N = X.shape
    if len(gene_names) != N:
        raise ValueError(f"gene_names has {len(gene_names)} entries, X has {N} columns")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    M, k = _membership(pd.Index(gene_names), gene_sets)
    if (k == 0).any():
        name = list(gene_sets)[int(np.flatnonzero(k == 0)[0])]
        raise ValueError(f"gene set {name!r} has no measured member")
    if (k >= N).any():
        name = list(gene_sets)[int(np.flatnonzero(k >= N)[0])]
        raise ValueError(f"gene set {name!r} contains every measured gene")
    if device is not None and device != "cpu":
        return _ssgsea_torch(X, M, k, weight=weight, chunk_size=chunk_size, device=device)
    # weight of the gene whose doubled average rank is m: ((m / 2) * 10000 / N) ** weight
    table = (np.arange(2 * N + 2) * (5000.0 / N)) ** weight
    MT = M.T.tocsr()
    c = min(chunk_size, S)
    pos_tiled = np.tile(np.arange(1, N + 1, dtype=np.float64), c)          # N - p = j + 1 (see below)
    w_tiled = np.tile(table[np.arange(2, 2 * N + 2, 2)], c)                 # weights without ties
    row_off = (np.arange(c, dtype=np.int64) * N)[:, None]
    half = N * (N + 1) / 2.0
    out = np.empty((S, len(k)))

    def chunk(s0: int) -> None:
        Xc = X[s0:s0 + chunk_size]
        n = Xc.size
        o, tie_idx, tie_r2 = _stable_order_and_ranks(Xc)
        # Position in the decreasing order is N - 1 - j for ascending index j, so N - p = j + 1.
        flat = (o + row_off[:Xc.shape[0]]).ravel()  # flat index of the gene at each sorted position
        w_sorted = w_tiled[:n].copy()
        w_sorted[tie_idx] = table[tie_r2]
        W = np.empty(n)
        NP = np.empty(n)
        W[flat] = w_sorted
        NP[flat] = pos_tiled[:n]
        W = W.reshape(Xc.shape)
        NP = NP.reshape(Xc.shape)
        den = (MT @ W.T).T
        snp = (MT @ NP.T).T
        W *= NP
        num = (MT @ W.T).T
        out[s0:s0 + chunk_size] = num / den - (half - snp) / (N - k)

    starts = list(range(0, S, chunk_size))
    n_jobs = max(1, min(int(n_jobs), len(starts)))
    if n_jobs == 1:
        for s0 in starts:
            chunk(s0)
    else:  # numpy releases the GIL in sorts, ufuncs and sparse products
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=n_jobs) as ex:
            list(ex.map(chunk, starts))
    return out


def _ssgsea_torch(X: np.ndarray, M, k: np.ndarray, *, weight: float, chunk_size: int, device: str) -> np.ndarray:
    """torch twin of :func:`ssgsea_es` (same arithmetic in float64), for CUDA devices."""
    import torch

    dev = torch.device("cpu" if device == "cpu-torch" else device)
    S, N = X.shape
    Md = torch.as_tensor(M.toarray(), dtype=torch.float64, device=dev)
    kt = torch.as_tensor(k, dtype=torch.float64, device=dev)
    pos = torch.arange(N, device=dev)
    pos1 = (pos + 1).to(torch.float64)
    out = []
    for s0 in range(0, S, chunk_size):
        Xc = torch.as_tensor(X[s0:s0 + chunk_size], dtype=torch.float64, device=dev)
        xs, o = torch.sort(Xc, dim=1, stable=True)
        new = torch.ones_like(xs, dtype=torch.bool)
        new[:, 1:] = xs[:, 1:] != xs[:, :-1]
        start = torch.cummax(torch.where(new, pos, torch.zeros_like(pos)), dim=1).values
        last = torch.ones_like(new)
        last[:, :-1] = new[:, 1:]
        end = torch.flip(torch.cummin(torch.flip(torch.where(last, pos, torch.full_like(pos, N - 1)), [1]), dim=1)
                         .values, [1])
        w_sorted = ((start + end).to(torch.float64) / 2.0 + 1.0) * (10000.0 / N)
        w_sorted = w_sorted ** weight
        W = torch.empty_like(Xc).scatter_(1, o, w_sorted)
        A = torch.empty_like(Xc).scatter_(1, o, w_sorted * pos1)
        NP = torch.empty_like(Xc).scatter_(1, o, pos1.expand_as(Xc).contiguous())
        es = (A @ Md) / (W @ Md) - (N * (N + 1) / 2.0 - NP @ Md) / (N - kt)
        out.append(es.cpu().numpy())
    return np.concatenate(out, axis=0)


def _ssgsea_gseapy(X: np.ndarray, obs_names, var_names, gene_sets, *, weight: float, min_size: int,
                   max_size: int, threads: int) -> pd.DataFrame:
    import gseapy

    expr = pd.DataFrame(X.T, index=var_names, columns=obs_names)
    res = gseapy.ssgsea(data=expr, gene_sets=dict(gene_sets), sample_norm_method="rank", correl_norm_type="rank",
                        permutation_num=0, weight=weight, min_size=min_size, max_size=max_size, outdir=None,
                        threads=threads, no_plot=True, verbose=False)
    return res.res2d.pivot(index="Name", columns="Term", values="ES").astype(np.float64)


# -------------------------------------------------------------------- GSVA
_PRE_RES = 10000  # R GSVA's PRECOMPUTE_RESOLUTION (kernel_estimation.c), also used by gseapy
_PRE_MAX = 10.0   # R GSVA's MAX_PRECOMPUTE (in bandwidths)


def _gaussian_cdf_table() -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(np.arange(_PRE_RES + 1) * _PRE_MAX / _PRE_RES)


class GSVAScorer:
    """Gene Set Variation Analysis with kernel CDFs fitted on training samples.

    GSVA (Hänzelmann, Castelo & Guinney 2013, BMC Bioinformatics 14:7):

    1. For each gene ``g`` a kernel estimate of its CDF across the
       *reference* (training) samples ``x_{g,1..n}`` is evaluated at a
       sample's value ``y``: ``F_g(y) = (1/n) sum_i K((y - x_{g,i}) / h_g)``
       with ``K`` the standard normal CDF and ``h_g = sd(x_g) / 4``
       (``kcdf="Gaussian"``, for log-scale values) or the Poisson CDF
       ``ppois(y, x_{g,i} + 0.5)`` (``kcdf="Poisson"``, for counts); the
       gene's statistic is ``z_g = log(F_g / (1 - F_g))``.
    2. Within the sample genes are ranked by ``z`` (decreasing) and given the
       symmetric rank score ``r_j = |N - j - N/2|`` (``j`` = 0-based position).
    3. For each set a Kolmogorov-Smirnov-like random walk steps up by
       ``r_j^tau / sum_S r^tau`` at members and down by ``1/(N - k)``
       elsewhere; the score is ``max+ + max-`` of the walk (``mx_diff``),
       ``max+ - max-`` (``abs_ranking``), or the larger deviation.

    Only step 1 uses other samples.  Here they are the samples given to
    :meth:`fit` (the training fold), so :meth:`transform` scores any sample
    from the stored reference alone: a held-out sample's score does not
    depend on the other held-out samples (the standard GSVA run fits on all
    samples, which leaks across folds).  ``fit(a).transform(a)`` equals the
    usual all-sample GSVA on ``a``: it matches gseapy's ``gsva`` (a port of
    R GSVA's C kernel, including its precomputed normal-CDF table, used here
    with ``cdf="table"``).

    Parameters
    ----------
    gene_sets
        Set name -> gene identifiers.
    kcdf
        ``"Gaussian"``, ``"Poisson"`` (integer counts, not log-transformed) or
        ``"auto"`` (Poisson when the training values are counts).
    tau
        Random-walk weight exponent (1 in GSVA).
    mx_diff, abs_ranking
        Enrichment statistic (see step 3), defaults as in GSVA.
    min_size, max_size
        Gene-set size filter applied on the training genes.
    cdf
        ``"table"``: R GSVA's precomputed normal CDF (10,000 steps over 10
        bandwidths; reproduces R and gseapy), ``"exact"``: ``scipy.special.ndtr``.
    layer
        Use ``adata.layers[layer]`` instead of ``X``.
    max_chunk_elements
        Memory bound of the kernel evaluation (samples x references x genes per chunk).

    Attributes
    ----------
    genes_ : pd.Index
        Training genes (the transform input must contain them all).
    reference_ : ndarray (n_train, G)
        Training values: the kernel CDFs are nonparametric, so these *are*
        the fitted CDFs.
    bandwidth_ : ndarray (G,)
        Kernel bandwidths (``sd / 4``; 0.5 for Poisson).  Genes constant in
        training get bandwidth 0 and a neutral statistic ``z = 0``.
    gene_sets_ : dict
        Kept sets (after the size filter); ``report_`` says what was dropped.
    kcdf_ : str
        The kernel used.

    Examples
    --------
    >>> scorer = GSVAScorer(sets, kcdf="Gaussian").fit(adata[train_ids])
    >>> scores_test = scorer.transform(adata[test_ids])   # DataFrame samples x sets
    """

    def __init__(self, gene_sets: Mapping[str, Sequence[str]], *, kcdf: str = "Gaussian", tau: float = 1.0,
                 mx_diff: bool = True, abs_ranking: bool = False, min_size: int = 10, max_size: int = 500,
                 cdf: str = "table", layer: str | None = None, max_chunk_elements: int = 8_000_000) -> None:
        if kcdf not in ("Gaussian", "Poisson", "auto"):
            raise ValueError(f"kcdf must be 'Gaussian', 'Poisson' or 'auto', got {kcdf!r}")
        if cdf not in ("table", "exact"):
            raise ValueError(f"cdf must be 'table' or 'exact', got {cdf!r}")
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        if not gene_sets:
            raise ValueError("gene_sets is empty")
        self.gene_sets = {str(k): list(v) for k, v in gene_sets.items()}
        self.kcdf = kcdf
        self.tau = float(tau)
        self.mx_diff = bool(mx_diff)
        self.abs_ranking = bool(abs_ranking)
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.cdf = cdf
        self.layer = layer
        self.max_chunk_elements = int(max_chunk_elements)

    # -------------------------------------------------------------- fit
    def _matrix(self, adata) -> np.ndarray:
        return expression_matrix(adata, self.layer)

    def fit(self, adata) -> "GSVAScorer":
        """Store the training samples (the reference of the kernel CDFs) and filter the gene sets."""
        X = self._matrix(adata)
        if X.shape[0] < 2:
            raise InputError(f"GSVA needs at least 2 training samples, got {X.shape[0]}", field="obs")
        kcdf = self.kcdf
        if kcdf == "auto":
            kcdf = "Poisson" if detect_value_type(X) == "counts" else "Gaussian"
        if kcdf == "Poisson" and (X < 0).any():
            r, c = np.argwhere(X < 0)[0]
            raise InputError("negative value with kcdf='Poisson' (expects raw counts)",
                             patient=str(adata.obs_names[r]), field=str(adata.var_names[c]))
        self.kcdf_ = kcdf
        self.genes_ = pd.Index(adata.var_names)
        if self.genes_.duplicated().any():
            raise InputError("duplicated gene", field=str(self.genes_[self.genes_.duplicated()][0]))
        self.gene_sets_, self.report_ = filter_gene_sets(self.gene_sets, self.genes_, min_size=self.min_size,
                                                         max_size=self.max_size)
        self.reference_ = X
        if kcdf == "Gaussian":
            self.bandwidth_ = X.std(axis=0, ddof=1) / 4.0
        else:
            self.bandwidth_ = np.full(X.shape[1], 0.5)
        self.n_constant_genes_ = int((self.bandwidth_ == 0).sum()) if kcdf == "Gaussian" else 0
        pos = {g: i for i, g in enumerate(self.genes_)}
        self._set_idx = [np.array([pos[g] for g in m]) for m in self.gene_sets_.values()]
        self.report_ = dict(self.report_, kcdf=kcdf, n_train=int(X.shape[0]),
                            n_constant_genes=self.n_constant_genes_,
                            values_are_integers=bool(np.allclose(X, np.round(X))))
        if kcdf == "Poisson" and not self.report_["values_are_integers"]:
            log.warning("GSVA with kcdf='Poisson' on non-integer values (expects raw counts)")
        return self

    # -------------------------------------------------------- transform
    def _check_fitted(self) -> None:
        if not hasattr(self, "reference_"):
            raise RuntimeError("GSVAScorer is not fitted; call fit(adata_train) first")

    def gene_statistics(self, adata) -> np.ndarray:
        """Step 1: ``z = logit(F_g(y))`` per sample and training gene, ``(S, G)``."""
        self._check_fitted()
        missing = self.genes_.difference(pd.Index(adata.var_names))
        if len(missing):
            raise InputError(f"{len(missing)} training genes are missing from the input, e.g. "
                             f"{', '.join(map(str, missing[:5]))}", field="var_names")
        Y = self._matrix(adata[:, self.genes_] if not pd.Index(adata.var_names).equals(self.genes_) else adata)
        R = self.reference_
        n = R.shape[0]
        S, G = Y.shape
        F = np.empty((S, G))
        gc = max(1, self.max_chunk_elements // max(1, S * n))
        if self.kcdf_ == "Gaussian":
            table = _gaussian_cdf_table() if self.cdf == "table" else None
            from scipy.special import ndtr
            for g0 in range(0, G, gc):
                sl = slice(g0, g0 + gc)
                bw = self.bandwidth_[sl]
                with np.errstate(divide="ignore", invalid="ignore"):
                    v = (Y[:, None, sl] - R[None, :, sl]) / bw
                if table is not None:
                    idx = np.minimum(np.abs(v) * (_PRE_RES / _PRE_MAX), _PRE_RES)
                    idx = np.nan_to_num(idx, nan=0.0).astype(np.int64)
                    c = table[idx]
                    c = np.where(v < 0, 1.0 - c, c)
                    c = np.where(v < -_PRE_MAX, 0.0, np.where(v > _PRE_MAX, 1.0, c))
                else:
                    c = ndtr(v)
                F[:, sl] = c.mean(axis=1)
            const = self.bandwidth_ == 0
            F[:, const] = 0.5  # a gene constant in training carries no information: z = 0
        else:
            from scipy.special import pdtr
            if (Y < 0).any():
                r, c = np.argwhere(Y < 0)[0]
                raise InputError("negative value with kcdf='Poisson' (expects raw counts)",
                                 patient=str(adata.obs_names[r]), field=str(self.genes_[c]))
            Yf = np.floor(Y)
            for g0 in range(0, G, gc):
                sl = slice(g0, g0 + gc)
                F[:, sl] = pdtr(Yf[:, None, sl], R[None, :, sl] + 0.5).mean(axis=1)
        with np.errstate(divide="ignore"):
            return np.log(F) - np.log1p(-F)

    def transform(self, adata) -> pd.DataFrame:
        """GSVA scores, ``DataFrame`` (samples x kept sets), each row from that sample and the reference only."""
        Z = self.gene_statistics(adata)
        S, G = Z.shape
        # decreasing order, ties: later gene first (gseapy's stable ascending sort, reversed)
        order_asc = np.argsort(Z, axis=1, kind="stable")
        P = np.empty((S, G), dtype=np.int64)
        np.put_along_axis(P, order_asc, np.arange(G - 1, -1, -1)[None, :].repeat(S, 0), axis=1)
        out = np.empty((S, len(self._set_idx)))
        for j, idx in enumerate(self._set_idx):
            k = len(idx)
            p = np.sort(P[:, idx], axis=1).astype(np.float64)       # (S, k) member positions
            w = np.abs(G - p - G / 2.0) ** self.tau                  # rank score at those positions
            tot = w.sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                cw = np.cumsum(w, axis=1) / tot
            misses_before = (p - np.arange(k)[None, :]) / (G - k)
            tops = cw - misses_before                               # right after each hit
            bottoms = np.concatenate([np.zeros((S, 1)), cw[:, :-1]], axis=1) - misses_before  # just before
            mx_pos = np.maximum(tops.max(axis=1), 0.0)
            mx_neg = np.minimum(bottoms.min(axis=1), 0.0)
            if self.mx_diff:
                out[:, j] = mx_pos - mx_neg if self.abs_ranking else mx_pos + mx_neg
            else:
                out[:, j] = np.where(mx_pos > np.abs(mx_neg), mx_pos, mx_neg)
        return pd.DataFrame(out, index=pd.Index(adata.obs_names), columns=list(self.gene_sets_))

    def fit_transform(self, adata) -> pd.DataFrame:
        """``fit(adata).transform(adata)``: the classic all-sample GSVA on ``adata``."""
        return self.fit(adata).transform(adata)


def _gsva_gseapy(X: np.ndarray, obs_names, var_names, gene_sets, *, kcdf: str, tau: float, mx_diff: bool,
                 abs_ranking: bool, min_size: int, max_size: int, threads: int) -> pd.DataFrame:
    import gseapy

    expr = pd.DataFrame(X.T, index=var_names, columns=obs_names)
    res = gseapy.gsva(data=expr, gene_sets=dict(gene_sets), kcdf=kcdf, weight=tau, mx_diff=mx_diff,
                      abs_rnk=abs_ranking, min_size=min_size, max_size=max_size, threads=threads, outdir=None,
                      verbose=False)
    return res.res2d.pivot(index="Name", columns="Term", values="ES").astype(np.float64)


# -------------------------------------------------------- scanpy-style API
def score_pathways(
    adata,
    gene_sets: Mapping[str, Sequence[str]],
    *,
    method: str = "ssgsea",
    backend: str = "fast",
    layer: str | None = None,
    key_added: str = "pathway_scores",
    min_size: int = 10,
    max_size: int = 500,
    weight: float | None = None,
    kcdf: str = "Gaussian",
    threads: int = 1,
    device: str | None = None,
    copy: bool = False,
):
    """Per-sample pathway scores, scanpy-style.

    Parameters
    ----------
    adata
        AnnData, samples x genes.
    gene_sets
        Set name -> gene identifiers (filtered to measured genes and to
        ``[min_size, max_size]`` members; dropped sets are reported).
    method
        ``"ssgsea"``: raw per-sample ES (Barbie et al. 2009), leak-free by
        construction; ``"gsva"``: GSVA (Hänzelmann et al. 2013) with kernel
        CDFs fitted on *all samples of* ``adata`` (transductive: for
        cross-validation fit a :class:`GSVAScorer` on the training fold).
    backend
        ``"fast"``: this module's vectorised implementations; ``"gseapy"``:
        gseapy's (reference).
    layer
        Use ``adata.layers[layer]`` instead of ``adata.X``.
    key_added
        Scores (samples x sets, float32 DataFrame) go to
        ``adata.obsm[key_added]``; parameters to ``adata.uns[key_added]["params"]``
        and the gene-set report to ``adata.uns[key_added]["report"]``.
    weight
        Random-walk weight: default 0.25 for ssGSEA, 1.0 for GSVA.
    kcdf
        GSVA kernel: ``"Gaussian"``, ``"Poisson"`` or ``"auto"``.
    threads
        gseapy threads.
    device
        Fast ssGSEA on a torch device (e.g. ``"cuda"``); default numpy.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    AnnData or None
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    adata = adata.copy() if copy else adata
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} not found (layers: {', '.join(adata.layers) or 'none'})", field=layer)
    X = _dense(adata.layers[layer] if layer is not None else adata.X)
    if not np.isfinite(X).all():
        r, c = np.argwhere(~np.isfinite(X))[0]
        raise InputError("NaN or infinite expression value", patient=str(adata.obs_names[r]),
                         field=str(adata.var_names[c]))
    genes = pd.Index(adata.var_names)
    kept, report = filter_gene_sets(gene_sets, genes, min_size=min_size, max_size=max_size)
    names = sorted(kept)
    params = {"method": method, "backend": backend, "layer": layer, "min_size": min_size, "max_size": max_size}
    if method == "ssgsea":
        w = 0.25 if weight is None else float(weight)
        if backend == "fast":
            es = pd.DataFrame(ssgsea_es(X, genes, kept, weight=w, device=device), index=adata.obs_names,
                              columns=list(kept))
        else:
            es = _ssgsea_gseapy(X, adata.obs_names, genes, kept, weight=w, min_size=min_size, max_size=max_size,
                                threads=threads)
        params.update(sample_norm_method="rank", weight=w, score="ES (per-sample, not NES)")
    else:
        w = 1.0 if weight is None else float(weight)
        if backend == "fast":
            scorer = GSVAScorer(kept, kcdf=kcdf, tau=w, min_size=min_size, max_size=max_size)
            es = scorer.fit_transform(adata if layer is None else _with_x(adata, X))
            kcdf_used = scorer.kcdf_
        else:
            kcdf_used = kcdf if kcdf != "auto" else ("Poisson" if detect_value_type(X) == "counts" else "Gaussian")
            es = _gsva_gseapy(X, adata.obs_names, genes, kept, kcdf=kcdf_used, tau=w, mx_diff=True,
                              abs_ranking=False, min_size=min_size, max_size=max_size, threads=threads)
        params.update(weight=w, kcdf=kcdf_used, fitted_on=f"all {adata.n_obs} samples of this call")
    es = es.reindex(index=adata.obs_names, columns=names)
    adata.obsm[key_added] = es.astype(np.float32)
    adata.uns[key_added] = {"params": params, "report": report}
    return adata if copy else None


def _with_x(adata, X: np.ndarray):
    import anndata as ad

    return ad.AnnData(X=X, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=adata.var_names))


# ----------------------------------------------------- fold-level scoring
class PathwayScorer:
    """Fold-level omics featuriser: optional ComBat, then ssGSEA or GSVA (fit/transform).

    Everything estimated from samples (ComBat's location/scale parameters,
    GSVA's kernel CDFs) is fitted in :meth:`fit` on the training samples and
    applied unchanged by :meth:`transform`; ssGSEA has nothing to fit.

    Parameters
    ----------
    gene_sets
        Set name -> genes.
    method, backend, kcdf, min_size, max_size, weight
        As in :func:`score_pathways`.
    combat_batch_key
        ``adata.obs`` column with the batch (e.g. ``"site"``): ComBat
        (:class:`data_adapters.combat.ComBat`) is fitted on the training
        samples and applied before scoring.  ``None`` disables it.
    combat_kwargs
        Passed to :class:`~data_adapters.combat.ComBat` (e.g. ``new_batch="estimate"``).
    layer
        Expression layer to use.
    """

    def __init__(self, gene_sets: Mapping[str, Sequence[str]], *, method: str = "ssgsea", backend: str = "fast",
                 kcdf: str = "Gaussian", min_size: int = 10, max_size: int = 500, weight: float | None = None,
                 combat_batch_key: str | None = None, combat_kwargs: dict | None = None,
                 layer: str | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if method == "gsva" and backend == "gseapy":
            raise ValueError("backend='gseapy' cannot fit GSVA on training samples only; use backend='fast'")
        self.gene_sets = gene_sets
        self.method = method
        self.backend = backend
        self.kcdf = kcdf
        self.min_size = min_size
        self.max_size = max_size
        self.weight = weight
        self.combat_batch_key = combat_batch_key
        self.combat_kwargs = dict(combat_kwargs or {})
        self.layer = layer

    def _prepare(self, adata):
        import anndata as ad

        X = _dense(adata.layers[self.layer] if self.layer is not None else adata.X)
        return ad.AnnData(X=X, obs=adata.obs.copy(), var=pd.DataFrame(index=adata.var_names))

    def fit(self, adata) -> "PathwayScorer":
        a = self._prepare(adata)
        if self.combat_batch_key is not None:
            from data_adapters.combat import ComBat

            self.combat_ = ComBat(self.combat_batch_key, **self.combat_kwargs).fit(a)
            a = self.combat_.transform(a)
        self.genes_ = pd.Index(a.var_names)
        self.gene_sets_, self.report_ = filter_gene_sets(self.gene_sets, self.genes_, min_size=self.min_size,
                                                         max_size=self.max_size)
        self.report_.update(method=self.method, backend=self.backend, n_train=int(a.n_obs))
        if self.method == "gsva":
            self.gsva_ = GSVAScorer(self.gene_sets_, kcdf=self.kcdf, tau=1.0 if self.weight is None else self.weight,
                                    min_size=self.min_size, max_size=self.max_size).fit(a)
            self.report_.update(kcdf=self.gsva_.kcdf_, n_constant_genes=self.gsva_.n_constant_genes_)
        if self.combat_batch_key is not None:
            self.report_.update(combat_batch_key=self.combat_batch_key, combat_batches=list(self.combat_.batches_))
        return self

    def transform(self, adata) -> pd.DataFrame:
        if not hasattr(self, "genes_"):
            raise RuntimeError("PathwayScorer is not fitted; call fit(adata_train) first")
        a = self._prepare(adata)
        if self.combat_batch_key is not None:
            a = self.combat_.transform(a)
        if self.method == "gsva":
            return self.gsva_.transform(a)
        missing = self.genes_.difference(a.var_names)
        if len(missing):
            raise InputError(f"{len(missing)} training genes are missing, e.g. {', '.join(missing[:5])}",
                             field="var_names")
        X = _dense(a[:, self.genes_].X)
        w = 0.25 if self.weight is None else self.weight
        if self.backend == "fast":
            es = ssgsea_es(X, self.genes_, self.gene_sets_, weight=w)
            return pd.DataFrame(es, index=a.obs_names, columns=list(self.gene_sets_))
        es = _ssgsea_gseapy(X, a.obs_names, self.genes_, self.gene_sets_, weight=w, min_size=self.min_size,
                            max_size=self.max_size, threads=1)
        return es.reindex(index=a.obs_names, columns=list(self.gene_sets_))

    def fit_transform(self, adata) -> pd.DataFrame:
        return self.fit(adata).transform(adata)


# ------------------------------------------------------------ cohort level
def load_expression_for_cohort(expression_path: str | Path, patient_ids: Sequence[str], *,
                               orientation: str = "auto", adapter: str | None = None,
                               duplicates: str = "aggregate") -> tuple[object, dict]:
    """Expression of the manifest's patients, counts turned into log-CPM.

    Returns the AnnData restricted to samples that are manifest patients (in
    manifest order; ``X`` = log1p CPM when the file holds counts, else the
    values as read) and a report counting samples not in the manifest and
    patients without expression.
    """
    adata = read_expression(expression_path, orientation=orientation, adapter=adapter, duplicates=duplicates)
    X = _dense(adata.X)
    if (X < 0).any() and looks_like_counts(np.abs(X)):
        raise InputError("negative values in what looks like a count matrix", file=expression_path, field="X")
    counts = looks_like_counts(X)
    pids = set(patient_ids)
    present = set(adata.obs_names)
    in_manifest = [p for p in patient_ids if p in present]
    extra = [s for s in adata.obs_names if s not in pids]
    sub = adata[in_manifest].copy()
    if counts:
        sub.layers["counts"] = sub.X.copy()
        sub.X = log_cpm(_dense(sub.X)).astype(np.float32)
    report = dict(adata.uns.get("expression_report", {}))
    report.update(
        input_was_counts=counts,
        n_samples_in_file=int(adata.n_obs),
        n_samples_not_in_manifest=len(extra),
        n_patients_without_expression=int(len(patient_ids) - len(in_manifest)),
    )
    return sub, report


def pathway_scores_for_cohort(
    expression_path: str | Path,
    gmt_path: str | Path,
    patient_ids: list[str],
    *,
    min_size: int = 10,
    max_size: int = 500,
    method: str = "ssgsea",
    backend: str = "fast",
    orientation: str = "auto",
    fit_ids: Sequence[str] | None = None,
    combat_batch: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Pathway scores (patients x sets) for the manifest's patients.

    Patients absent from the expression file get a row of NaN (their omics
    modality is absent); samples in the expression file that are not in the
    manifest are ignored.  Both are counted in the returned report.  Counts
    are scored on log1p CPM (irrelevant for ssGSEA, which is rank-based).

    ``method="ssgsea"`` is per sample and needs no training set.  For
    ``method="gsva"`` (or ComBat via ``combat_batch``, a mapping patient ->
    batch) pass ``fit_ids``, the training patients the kernel CDFs / ComBat
    parameters are fitted on; without them a ``ValueError`` is raised, as
    fitting on every patient would leak across folds.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if (method == "gsva" or combat_batch is not None) and fit_ids is None:
        raise ValueError("GSVA and ComBat are fitted on training patients: pass fit_ids= (the training fold), "
                         "or use PathwayScorer.fit(train).transform(any) per fold")
    sub, report0 = load_expression_for_cohort(expression_path, patient_ids, orientation=orientation)
    gene_sets = read_gene_sets(gmt_path)
    if combat_batch is not None:
        sub.obs["batch"] = [str(combat_batch.get(p)) for p in sub.obs_names]
    try:
        if fit_ids is None:
            scorer = PathwayScorer(gene_sets, method=method, backend=backend, min_size=min_size, max_size=max_size)
            scorer.fit(sub)
        else:
            fit_set = set(fit_ids)
            train = sub[[s for s in sub.obs_names if s in fit_set]].copy()
            scorer = PathwayScorer(gene_sets, method=method, backend=backend, min_size=min_size, max_size=max_size,
                                   combat_batch_key="batch" if combat_batch is not None else None).fit(train)
        raw = scorer.transform(sub) if sub.n_obs else pd.DataFrame(columns=list(scorer.gene_sets_))
    except InputError as err:
        raise InputError(err.message, file=f"{expression_path} + {gmt_path}", field=err.field or "gene_sets") from None
    scores = raw[sorted(raw.columns)].astype(np.float32).reindex(patient_ids)
    report = dict(scorer.report_)
    report.update(report0)
    report.update(method=method, backend=backend,
                  n_patients_without_expression=int(scores.isna().all(axis=1).sum()))
    return scores, report
