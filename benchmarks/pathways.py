"""Fast vectorised ssGSEA vs gseapy's ssGSEA on a synthetic expression matrix.

Both compute the raw per-sample enrichment score (Barbie et al. 2009) with
``sample_norm_method="rank"``, weight 0.25, no permutations, on the same
matrix, in the same process, one after the other.  Printed: wall time of
each (and CPU time of the process, less sensitive to other jobs on the
machine), the speed ratio (also for ours on float64 input, which takes a
slower exact sort path), the peak Python-heap memory of ours (tracemalloc,
which tracks numpy's buffers), the minimum over gene sets of the Spearman
correlation between the two (across samples), and the maximum absolute
difference.

Run: ``python benchmarks/pathways.py [--genes 20000] [--samples 500] [--sets 50] [--threads 2]``
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def synthetic(n_genes: int = 20000, n_samples: int = 500, n_sets: int = 50, *, seed: int = 0):
    """Log-scale expression (samples x genes) with gene-specific levels, planted set activity and ties at 0.

    Returns ``(X float32 (S, G), gene names, gene sets)``; set sizes are drawn
    between 15 and 500.
    """
    rng = np.random.default_rng(seed)
    genes = np.array([f"GENE{i:05d}" for i in range(n_genes)], dtype=object)
    base = rng.gamma(2.0, 1.5, size=n_genes)
    X = base[None, :] + rng.normal(0.0, 1.0, size=(n_samples, n_genes))
    sets = {}
    for k in range(n_sets):
        size = int(rng.integers(15, 501))
        members = rng.choice(n_genes, size, replace=False)
        sets[f"SET_{k:02d}"] = genes[members].tolist()
        if k % 2 == 0:  # planted activity on half of the sets
            X[:, members] += rng.normal(0.0, 0.7, size=n_samples)[:, None]
    X = np.maximum(X, 0.0).astype(np.float32)  # detection floor (ties at zero); AnnData's float32
    return X, pd.Index(genes), sets


def run(n_genes: int = 20000, n_samples: int = 500, n_sets: int = 50, *, threads: int = 2, seed: int = 0,
        verbose: bool = True) -> dict:
    """Time and compare both implementations; returns the figures printed by :func:`main`."""
    from scipy.stats import spearmanr

    from data_adapters.omics import _ssgsea_gseapy, ssgsea_es

    X, genes, sets = synthetic(n_genes, n_samples, n_sets, seed=seed)
    obs = pd.Index([f"S{i:04d}" for i in range(n_samples)])

    ssgsea_es(X[:2], genes, sets, weight=0.25)  # warm-up (imports), not timed
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    ours = ssgsea_es(X, genes, sets, weight=0.25)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    t0, c0 = time.perf_counter(), time.process_time()
    ref = _ssgsea_gseapy(X, obs, genes, sets, weight=0.25, min_size=1, max_size=100000, threads=threads)
    t_ref, c_ref = time.perf_counter() - t0, time.process_time() - c0
    ref = ref.loc[obs, list(sets)].to_numpy(dtype=np.float64)

    # the same scores from float64 values that are not float32-exact (slower sort path)
    X64 = X.astype(np.float64) + np.random.default_rng(seed + 1).uniform(0, 1e-9, size=X.shape)
    t0 = time.perf_counter()
    ssgsea_es(X64, genes, sets, weight=0.25)
    t_ours64 = time.perf_counter() - t0

    rho = [spearmanr(ours[:, j], ref[:, j])[0] for j in range(len(sets))]
    out = {
        "shape": (n_genes, n_samples, n_sets),
        "t_ours_s": t_ours,
        "t_gseapy_s": t_ref,
        "t_ours_float64_s": t_ours64,
        "speedup": t_ref / t_ours,
        "cpu_ours_s": c_ours,
        "cpu_gseapy_s": c_ref,
        "speedup_cpu": c_ref / c_ours,
        "peak_mem_ours_mb": peak / 2**20,
        "input_mb": X.nbytes / 2**20,
        "speedup_float64": t_ref / t_ours64,
        "min_spearman": float(np.min(rho)),
        "max_abs_diff": float(np.abs(ours - ref).max()),
        "threads_gseapy": threads,
        "cpus": os.cpu_count(),
    }
    if verbose:
        print(f"synthetic matrix: {n_genes} genes x {n_samples} samples x {n_sets} gene sets "
              f"({out['input_mb']:.0f} MB float32), {out['cpus']} CPUs")
        print(f"ours (fast, numpy, 1 thread)  : wall {t_ours:7.2f} s   CPU {c_ours:7.2f} s   "
              f"peak memory {out['peak_mem_ours_mb']:.0f} MB")
        print(f"gseapy 1.3 ssgsea (threads={threads}): wall {t_ref:7.2f} s   CPU {c_ref:7.2f} s")
        print(f"ours on a float64 (not float32-exact) copy: {t_ours64:.2f} s ({out['speedup_float64']:.1f}x)")
        print(f"speed-up: {out['speedup']:.1f}x wall, {out['speedup_cpu']:.1f}x CPU   "
              f"min Spearman over sets: {out['min_spearman']:.6f}   max |ES diff|: {out['max_abs_diff']:.2e}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--genes", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--sets", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="gseapy threads")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    run(a.genes, a.samples, a.sets, threads=a.threads, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
