"""Plug-in registries for expression readers and gene-set collections.

Two registries, filled by decorators and, for third-party packages, by
entry points (no fork of radfusion needed):

========================  ===================================  ==========================================
registry                  decorator                            entry-point group
========================  ===================================  ==========================================
expression adapters       :func:`register_omics_adapter`       ``radfusion.omics_adapters``
gene-set sources          :func:`register_gene_set_source`     ``radfusion.gene_set_sources``
========================  ===================================  ==========================================

Contracts
---------
An **omics adapter** is a callable ``adapter(path, **kwargs) -> AnnData`` that
returns samples as ``obs`` and genes as ``var`` (raw values in ``X``).  What it
returns goes through the same checks as the built-in readers
(:func:`data_adapters.omics.read_expression`): gene identifiers are
harmonised, duplicated genes aggregated and reported, non-finite values
rejected with the sample and gene named.

A **gene-set source** is a callable ``source(path_or_name, **kwargs) ->
dict[str, list[str]]`` (set name -> gene identifiers).

Built-in adapters: ``h5ad``, ``csv``, ``tsv``, ``parquet``; built-in gene-set
source: ``gmt``.  Entry points are loaded lazily, the first time a registry is
listed or a name is looked up.  A plug-in whose import fails does not break
the others: it is logged, and asking for it by name raises the import error.

Example (a third-party package's ``pyproject.toml``)::

    [project.entry-points."radfusion.omics_adapters"]
    loom = "radfusion_loom:read_loom"

and ``radfusion_loom.py``::

    def read_loom(path, **kwargs):
        import anndata
        return anndata.read_loom(path)     # obs = cells/samples, var = genes
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

ADAPTER_GROUP = "radfusion.omics_adapters"
GENE_SET_GROUP = "radfusion.gene_set_sources"


class _Registry:
    """Name -> callable, with file suffixes and lazy entry-point discovery."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self.items: dict[str, Callable] = {}
        self.suffixes: dict[str, str] = {}
        self.origin: dict[str, str] = {}
        self.broken: dict[str, str] = {}
        self._discovered = False

    def register(self, name: str, fn: Callable, *, suffixes=(), origin: str = "builtin",
                 overwrite: bool = False) -> Callable:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if not callable(fn):
            raise ValueError(f"{self.kind} {name!r} must be callable, got {type(fn).__name__}")
        if name in self.items and self.items[name] is not fn and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self.origin[name]}); "
                             "pass overwrite=True to replace it")
        self.items[name] = fn
        self.origin[name] = origin
        for s in suffixes:
            self.suffixes[s.lower() if s.startswith(".") else "." + s.lower()] = name
        return fn

    def discover(self, *, force: bool = False) -> None:
        """Load this registry's entry points (once, unless ``force``)."""
        if self._discovered and not force:
            return
        self._discovered = True
        from importlib.metadata import entry_points

        try:
            eps = entry_points(group=self.group)
        except TypeError:  # pragma: no cover - Python < 3.10 API
            eps = entry_points().get(self.group, [])
        for ep in eps:
            if ep.name in self.items and not self.origin[ep.name].startswith("entry point"):
                # a built-in or explicitly registered name wins over a plug-in
                log.warning("%s %r from entry point %s is shadowed by the one registered in %s",
                            self.kind, ep.name, ep.value, self.origin[ep.name])
                continue
            try:
                fn = ep.load()
            except Exception as err:  # a broken plug-in must not break the others
                self.broken[ep.name] = f"{ep.value}: {type(err).__name__}: {err}"
                log.warning("could not load %s %r (%s): %s", self.kind, ep.name, ep.value, err)
                continue
            suffixes = getattr(fn, "radfusion_suffixes", ())
            self.register(ep.name, fn, suffixes=suffixes, origin=f"entry point {ep.value}", overwrite=True)

    def names(self) -> list[str]:
        self.discover()
        return sorted(self.items)

    def get(self, name: str) -> Callable:
        self.discover()
        if name in self.items:
            return self.items[name]
        if name in self.broken:
            raise ValueError(f"{self.kind} {name!r} is installed but failed to load: {self.broken[name]}")
        raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")


_ADAPTERS = _Registry("omics adapter", ADAPTER_GROUP)
_GENE_SETS = _Registry("gene-set source", GENE_SET_GROUP)


def _ensure_builtin() -> None:
    # importing the module registers the built-in readers
    import data_adapters.omics  # noqa: F401


# ------------------------------------------------------------------ adapters
def register_omics_adapter(name: str, *, suffixes: tuple[str, ...] = (), overwrite: bool = False):
    """Decorator registering an expression reader ``fn(path, **kwargs) -> AnnData``.

    Parameters
    ----------
    name
        Registry name (used by ``read_expression(..., adapter=name)`` and the
        CLI's ``--adapter``).
    suffixes
        File suffixes (e.g. ``(".loom",)``) for which the adapter is chosen
        automatically.
    overwrite
        Replace an adapter already registered under ``name``.
    """

    def deco(fn: Callable) -> Callable:
        return _ADAPTERS.register(name, fn, suffixes=suffixes, origin=getattr(fn, "__module__", "?"),
                                  overwrite=overwrite)

    return deco


def get_omics_adapter(name: str) -> Callable:
    """The adapter registered as ``name``; an unknown name lists the valid ones."""
    _ensure_builtin()
    return _ADAPTERS.get(name)


def list_omics_adapters() -> list[str]:
    """Sorted names of the registered adapters (built-in and entry points)."""
    _ensure_builtin()
    return _ADAPTERS.names()


def adapter_for_path(path: str | Path) -> str | None:
    """Name of the adapter registered for ``path``'s suffix (``.csv.gz`` -> ``.csv``), or None."""
    _ensure_builtin()
    _ADAPTERS.discover()
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zip") and len(suffixes) > 1:
        suffixes = suffixes[:-1]
    for i in range(len(suffixes)):
        key = "".join(suffixes[i:])
        if key in _ADAPTERS.suffixes:
            return _ADAPTERS.suffixes[key]
    return None


# ---------------------------------------------------------- gene-set sources
def register_gene_set_source(name: str, *, suffixes: tuple[str, ...] = (), overwrite: bool = False):
    """Decorator registering a gene-set source ``fn(path_or_name, **kwargs) -> dict[str, list[str]]``."""

    def deco(fn: Callable) -> Callable:
        return _GENE_SETS.register(name, fn, suffixes=suffixes, origin=getattr(fn, "__module__", "?"),
                                   overwrite=overwrite)

    return deco


def get_gene_set_source(name: str) -> Callable:
    """The gene-set source registered as ``name``; an unknown name lists the valid ones."""
    _ensure_builtin()
    return _GENE_SETS.get(name)


def list_gene_set_sources() -> list[str]:
    """Sorted names of the registered gene-set sources."""
    _ensure_builtin()
    return _GENE_SETS.names()


def gene_set_source_for_path(path: str | Path) -> str | None:
    """Name of the gene-set source registered for ``path``'s suffix, or None."""
    _ensure_builtin()
    _GENE_SETS.discover()
    for s in reversed([s.lower() for s in Path(str(path)).suffixes]):
        if s in _GENE_SETS.suffixes:
            return _GENE_SETS.suffixes[s]
    return None


def rediscover() -> None:
    """Reload entry points of both registries (after installing a plug-in at run time)."""
    _ADAPTERS.discover(force=True)
    _GENE_SETS.discover(force=True)
