"""Model card writer (Mitchell et al. 2019, "Model Cards for Model Reporting").

:func:`write_model_card` turns a run's resolved config, its evaluation
metrics (:mod:`fusion.evaluation` outputs) and a cohort summary into a
Markdown ``model_card.md`` with the sections of Mitchell et al.: model
details, intended use, factors, data, metrics, ethical considerations,
caveats and recommendations, limitations.

Privacy: the card holds **counts only**.  Values are read from a fixed list of
keys (a whitelist); anything else in the inputs -- patient identifiers, file
paths, free text -- is never written.  Site, modality and confounder names
are written as given.

Missing keys never raise: a metric that is absent or ``None`` reads
"not computed".

Reference: Mitchell M, Wu S, Zaldivar A, et al. Model Cards for Model
Reporting. FAT* 2019, 220-229. doi:10.1145/3287560.3287596
"""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any, Iterable

__all__ = ["write_model_card", "data_driven_caveats", "NOT_COMPUTED", "NOT_RECORDED",
           "MIN_SITE_TEST_PATIENTS", "MAX_CI_WIDTH", "MAX_PROBE_AUC", "HIGH_MISSING_RATE"]

NOT_COMPUTED = "not computed"
NOT_RECORDED = "not recorded"
# thresholds of the automatic caveats
MIN_SITE_TEST_PATIENTS = 30
MAX_CI_WIDTH = 0.2
MAX_PROBE_AUC = 0.6
HIGH_MISSING_RATE = 0.3

DEFAULT_INTENDED_USE = (
    "Research use only. This model is **not a medical device**: it has not been cleared or approved by "
    "any regulator and must not be used to diagnose, treat or make decisions about individual patients. "
    "It is intended for translational researchers studying multimodal prognostic or diagnostic signals in "
    "populations like the training cohort (same kind of disease, imaging protocols, sites and case mix). "
    "Performance on other populations, scanners or sites is unknown until it is externally validated."
)
OUT_OF_SCOPE = (
    "Out of scope: clinical decision making for individual patients; populations, scanners, acquisition "
    "protocols or sites unlike the training cohort; outcomes or time horizons other than the ones it was "
    "trained and evaluated on."
)


# ------------------------------------------------------------------ helpers
def _num(x) -> float | None:
    """A finite float, or ``None`` (bools, strings and NaN are not numbers here)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(x, digits: int = 3) -> str:
    v = _num(x)
    if v is None:
        return NOT_COMPUTED
    if float(v).is_integer() and isinstance(x, int):
        return str(int(v))
    return f"{v:.{digits}f}"


def _count(x, missing: str = NOT_COMPUTED) -> str:
    v = _num(x)
    return str(int(round(v))) if v is not None else missing


def _rec(x) -> str:
    return _count(x, NOT_RECORDED)


def _time(x) -> str:
    v = _num(x)
    return f"{v:.4g}" if v is not None else NOT_COMPUTED


def _pct(x) -> str:
    v = _num(x)
    return f"{100 * v:.1f}%" if v is not None else NOT_COMPUTED


def _cell(s: Any) -> str:
    """A Markdown table cell: no pipes or newlines."""
    return str(s).replace("|", "\\|").replace("\n", " ").strip()


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = [_cell(h) for h in header]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _get(d: Any, *keys, default=None):
    """Nested ``dict`` lookup that tolerates missing keys and non-dicts."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _as_dict(obj: Any) -> dict:
    if obj is None:
        return {}
    if hasattr(obj, "model_dump"):  # a pydantic ExperimentConfig
        return obj.model_dump()
    return obj if isinstance(obj, dict) else {}


def _ci(lo, hi) -> str:
    lo, hi = _num(lo), _num(hi)
    return f"{lo:.3f} to {hi:.3f}" if lo is not None and hi is not None else NOT_COMPUTED


def _site_rows(metrics: dict) -> list[dict]:
    rows = metrics.get("per_site")
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _probe_aucs(metrics: dict) -> dict[str, float | None]:
    probes = metrics.get("confounder_probe_auc")
    if not isinstance(probes, dict):
        return {}
    out = {}
    for name, v in sorted(probes.items(), key=lambda kv: str(kv[0])):
        out[str(name)] = _num(v.get("auc") if isinstance(v, dict) else v)
    return out


def _missing_rates(cohort: dict) -> dict[str, float | None]:
    """Modality -> missing rate from ``cohort_summary["modalities"]`` (rate, or counts)."""
    mods = cohort.get("modalities")
    if not isinstance(mods, dict):
        return {}
    n_all = _num(cohort.get("n_patients"))
    out = {}
    for m, v in sorted(mods.items(), key=lambda kv: str(kv[0])):
        rate = None
        if isinstance(v, dict):
            rate = _num(v.get("missing_rate"))
            present, missing = _num(v.get("n_present")), _num(v.get("n_missing"))
            if rate is None and present is not None and missing is not None and present + missing > 0:
                rate = missing / (present + missing)
            elif rate is None and present is not None and n_all:
                rate = 1.0 - present / n_all
        else:
            rate = _num(v)
        out[str(m)] = rate
    return out


def _task(config: dict, metrics: dict) -> str:
    kind = _get(config, "task", "kind")
    if kind in ("survival", "classification"):
        return kind
    return "classification" if "accuracy" in metrics or "log_loss" in metrics else "survival"


# ------------------------------------------------------------------ caveats
def data_driven_caveats(metrics: dict, cohort_summary: dict, *, task: str | None = None) -> list[str]:
    """Caveats triggered by the numbers.

    * a site with fewer than ``MIN_SITE_TEST_PATIENTS`` (30) test patients
      (``metrics["per_site"]`` rows, else ``cohort_summary["sites"][s]["n_test"]``);
    * a site whose C-index could not be computed;
    * a bootstrap CI wider than ``MAX_CI_WIDTH`` (0.2);
    * a confounder probe AUC above ``MAX_PROBE_AUC`` (0.6);
    * a modality missing in more than ``HIGH_MISSING_RATE`` (30%) of patients;
    * headline metrics that could not be computed.
    """
    metrics, cohort = _as_dict(metrics), _as_dict(cohort_summary)
    out: list[str] = []
    rows = [r for r in _site_rows(metrics) if str(r.get("group")) != "all"]
    small = [(str(r.get("group")), _num(r.get("n"))) for r in rows]
    if not rows and isinstance(cohort.get("sites"), dict):
        small = [(str(s), _num(_get(v, "n_test"))) for s, v in cohort["sites"].items()]
    small = [(s, n) for s, n in small if n is not None and n < MIN_SITE_TEST_PATIENTS]
    if small:
        out.append("Small test sites (< {} test patients): {}. Their per-site estimates are imprecise."
                   .format(MIN_SITE_TEST_PATIENTS, ", ".join(f"{s} (n = {int(n)})" for s, n in small)))
    score = "auc" if task == "classification" else "harrell_c"
    undefined = [str(r.get("group")) for r in rows if _num(r.get(score)) is None]
    if undefined:
        out.append(("ROC AUC not computable (a class absent)" if task == "classification" else
                    "C-index not computable (fewer than 2 comparable pairs)") + " at site(s): "
                   + ", ".join(undefined) + ".")
    wide = []
    for r in _site_rows(metrics):
        lo, hi = _num(r.get("ci_low")), _num(r.get("ci_high"))
        if lo is not None and hi is not None and hi - lo > MAX_CI_WIDTH:
            wide.append(f"{r.get('group')} ({lo:.2f} to {hi:.2f})")
    if wide:
        out.append(f"Wide 95% bootstrap CIs (width > {MAX_CI_WIDTH}): {', '.join(wide)}. "
                   "Differences between sites may be chance.")
    leaky = [(k, v) for k, v in _probe_aucs(metrics).items() if v is not None and v > MAX_PROBE_AUC]
    if leaky:
        out.append("The fused embedding still encodes confounder(s) (probe AUC > {}): {}. Predictions may "
                   "partly reflect site/scanner/population rather than biology.".format(
                       MAX_PROBE_AUC, ", ".join(f"{k} (AUC {v:.2f})" for k, v in leaky)))
    high = [(m, r) for m, r in _missing_rates(cohort).items() if r is not None and r > HIGH_MISSING_RATE]
    if high:
        out.append("High missing rates (> {:.0f}% of patients): {}. The model relies on the other "
                   "modalities for these patients; performance may differ between patients with and "
                   "without them.".format(100 * HIGH_MISSING_RATE,
                                          ", ".join(f"{m} ({100 * r:.0f}%)" for m, r in high)))
    task = task or _task({}, metrics)
    headline = ("auc", "accuracy") if task == "classification" else ("harrell_c", "uno_c", "ibs")
    absent = [k for k in headline if _num(metrics.get(k)) is None]
    if absent:
        out.append("Not computed on the test set: " + ", ".join(absent) + " (see the evaluation notes).")
    return out


# ------------------------------------------------------------------ sections
def _model_details(config: dict, task: str) -> list[str]:
    lines = ["## Model details", ""]
    name = _get(config, "name", default="experiment")
    lines.append(f"- Name: {_cell(name)}")
    if task == "survival":
        lines.append("- Task: survival (Cox partial likelihood); the model outputs a log relative hazard "
                     "(`risk`), higher = worse outcome (earlier event).")
    else:
        lines.append("- Task: classification; the model outputs class probabilities.")
    fusion = _get(config, "fusion", default={}) or {}
    fdesc = _cell(fusion.get("name", NOT_COMPUTED)) if isinstance(fusion, dict) else NOT_COMPUTED
    extras = [f"{k} = {fusion[k]}" for k in ("hidden", "dropout", "aux_loss_weight")
              if isinstance(fusion, dict) and _num(fusion.get(k)) is not None]
    lines.append(f"- Fusion strategy: {fdesc}" + (f" ({', '.join(extras)})" if extras else ""))
    lines.append(f"- Seed: {_count(_get(config, 'seed'))}")
    adv = _get(config, "adversary", default={}) or {}
    if isinstance(adv, dict) and adv.get("enabled"):
        conf = ", ".join(str(c) for c in adv.get("confounders", []) or [])
        how = {"closed_form": "closed-form linear dependence penalty (embedding and risk vs each confounder)",
               "confusion": "adversarial heads (domain confusion)",
               "reverse": "adversarial heads (gradient reversal)"}.get(str(adv.get("mode", "closed_form")),
                                                                       f"mode {_cell(str(adv.get('mode')))}")
        lines.append(f"- Confounder removal: {how} on {_cell(conf) or 'none'}, weight {_fmt(adv.get('weight'))}")
    else:
        lines.append("- Confounder removal: none (adversaries disabled)")
    split = _get(config, "split", default={}) or {}
    if isinstance(split, dict) and split.get("scheme"):
        desc = {"loso": "leave-one-site-out", "holdout": "hold-out"}.get(str(split["scheme"]), str(split["scheme"]))
        lines.append(f"- Validation: {_cell(desc)}")
    lines += ["", "Encoders per modality:", ""]
    mods = _get(config, "modalities", default={}) or {}
    rows = []
    if isinstance(mods, dict):
        for m in sorted(mods, key=str):
            mc = mods[m] if isinstance(mods[m], dict) else {}
            rows.append([m, mc.get("encoder", NOT_COMPUTED), _count(mc.get("out_dim"))])
    lines += _table(["modality", "encoder", "output dim"], rows) if rows else ["(no modality listed)"]
    lines += ["", "Training settings:", ""]
    train = _get(config, "training", default={}) or {}
    keys = ("epochs", "batch_size", "lr", "weight_decay", "patience", "modality_dropout")
    trows = [[k, f"{_num(train.get(k)):g}"]
             for k in keys if isinstance(train, dict) and _num(train.get(k)) is not None]
    lines += _table(["setting", "value"], trows) if trows else ["(not recorded)"]
    return lines + [""]


def _data_section(cohort: dict) -> list[str]:
    lines = ["## Data", "", "Counts only; no patient identifiers are reported.", ""]
    lines.append(f"- Patients: {_rec(cohort.get('n_patients'))}")
    lines.append(f"- Events: {_rec(cohort.get('n_events'))}")
    splits = cohort.get("splits")
    if isinstance(splits, dict) and splits:
        rows = []
        for s, v in splits.items():
            n = _get(v, "n", default=_get(v, "n_patients")) if isinstance(v, dict) else v
            rows.append([s, _rec(n), _rec(_get(v, "n_events"))])
        lines += ["", "Patients per split:", ""] + _table(["split", "patients", "events"], rows)
    sites = cohort.get("sites")
    if isinstance(sites, dict) and sites:
        rows = []
        for s in sorted(sites, key=str):
            v = sites[s]
            n = _get(v, "n", default=_get(v, "n_patients")) if isinstance(v, dict) else v
            rows.append([s, _rec(n), _rec(_get(v, "n_events")), _rec(_get(v, "n_test"))])
        lines += ["", "Patients per site:", ""] + _table(["site", "patients", "events", "test patients"], rows)
    rates = _missing_rates(cohort)
    if rates:
        mods = cohort["modalities"]
        rows = [[m, _rec(_get(mods.get(m), "n_present")), _pct(r)] for m, r in rates.items()]
        lines += ["", "Modalities:", ""] + _table(["modality", "patients with it", "missing rate"], rows)
    return lines + [""]


def _metrics_section(metrics: dict, task: str) -> list[str]:
    lines = ["## Metrics", "", "### Overall (test set)", ""]
    ci = metrics.get("ci") if isinstance(metrics.get("ci"), dict) else {}
    all_row = next((r for r in _site_rows(metrics) if str(r.get("group")) == "all"), None)

    def ci_of(key):
        v = ci.get(key)
        if isinstance(v, (list, tuple)) and len(v) == 2:
            return _ci(*v)
        if key == "harrell_c" and all_row is not None:
            return _ci(all_row.get("ci_low"), all_row.get("ci_high"))
        return NOT_COMPUTED

    if task == "survival":
        td = metrics.get("td_auc") if isinstance(metrics.get("td_auc"), dict) else {}
        cal = metrics.get("calibration") if isinstance(metrics.get("calibration"), dict) else {}
        tau = _num(metrics.get("uno_tau"))
        h = _num(cal.get("horizon"))
        at_h = f" at t = {h:.3g}" if h is not None else ""
        rows = [
            ["Harrell's C-index", _fmt(metrics.get("harrell_c")), ci_of("harrell_c")],
            ["Uno's C-index" + (f" (tau = {tau:.3g})" if tau is not None else ""), _fmt(metrics.get("uno_c")),
             ci_of("uno_c")],
            ["Mean time-dependent AUC", _fmt(td.get("mean_auc")), ci_of("mean_auc")],
            ["Integrated Brier score", _fmt(metrics.get("ibs")), ci_of("ibs")],
            ["Calibration: ICI" + at_h, _fmt(cal.get("ici")), ci_of("ici")],
            ["Calibration: slope", _fmt(cal.get("slope")), ci_of("slope")],
            ["Calibration: observed/expected" + at_h, _fmt(cal.get("oe_ratio")), ci_of("oe_ratio")],
        ]
    else:
        cal = metrics.get("calibration") if isinstance(metrics.get("calibration"), dict) else {}
        rows = [
            ["ROC AUC", _fmt(metrics.get("auc")), ci_of("auc")],
            ["Brier score", _fmt(metrics.get("brier")), ci_of("brier")],
            ["Log loss", _fmt(metrics.get("log_loss")), ci_of("log_loss")],
            ["Accuracy", _fmt(metrics.get("accuracy")), ci_of("accuracy")],
            ["Expected calibration error", _fmt(cal.get("ece")), ci_of("ece")],
        ]
    n_te = metrics.get("n_test", metrics.get("n"))
    if _num(n_te) is not None:
        lines += [f"Test patients: {_count(n_te)}"
                  + (f", events: {_count(metrics.get('n_test_events'))}" if task == "survival" else ""), ""]
    lines += _table(["metric", "value", "95% CI"], rows) + [""]

    lines += ["### Per site", ""]
    site_rows = _site_rows(metrics)
    if site_rows and task == "classification":
        lines += ["ROC AUC per site with a 95% percentile bootstrap CI over patients.", ""]
        lines += _table(["site", "patients", "class counts", "ROC AUC", "95% CI"],
                        [[r.get("group", "?"), _count(r.get("n")), _cell(r.get("class_counts", "")),
                          _fmt(r.get("auc")), _ci(r.get("ci_low"), r.get("ci_high"))] for r in site_rows])
    elif site_rows:
        lines += ["Harrell's C-index per site with a 95% percentile bootstrap CI over patients.", ""]
        lines += _table(["site", "patients", "events", "C-index", "95% CI"],
                        [[r.get("group", "?"), _count(r.get("n")), _count(r.get("n_events")),
                          _fmt(r.get("harrell_c")), _ci(r.get("ci_low"), r.get("ci_high"))] for r in site_rows])
    else:
        lines.append(NOT_COMPUTED)
    lines.append("")

    if task == "survival":
        lines += ["### Time-dependent AUC", ""]
        td = metrics.get("td_auc") if isinstance(metrics.get("td_auc"), dict) else None
        if td and isinstance(td.get("times"), list) and isinstance(td.get("auc"), list):
            lines += _table(["time", "cumulative/dynamic AUC"],
                            [[_time(t), _fmt(a)] for t, a in zip(td["times"], td["auc"])])
        else:
            lines.append(NOT_COMPUTED)
        lines.append("")
        lines += ["### Brier score", ""]
        br = metrics.get("brier") if isinstance(metrics.get("brier"), dict) else None
        if br and isinstance(br.get("times"), list) and isinstance(br.get("scores"), list):
            lines += _table(["time", "Brier score"],
                            [[_time(t), _fmt(s)] for t, s in zip(br["times"], br["scores"])])
        else:
            lines.append(NOT_COMPUTED)
        lines += ["", f"Integrated Brier score: {_fmt(metrics.get('ibs'))}", ""]

    lines += ["### Calibration", ""]
    cal = metrics.get("calibration") if isinstance(metrics.get("calibration"), dict) else None
    if cal and isinstance(cal.get("groups"), list):
        lines += [f"Predicted vs Kaplan-Meier observed event probability at t = {_time(cal.get('horizon'))}, "
                  "by group of predicted risk.", ""]
        lines += _table(["group", "patients", "predicted", "observed"],
                        [[i + 1, _count(g.get("n")), _fmt(g.get("predicted")), _fmt(g.get("observed"))]
                         for i, g in enumerate(cal["groups"]) if isinstance(g, dict)])
        lines += ["", f"ICI {_fmt(cal.get('ici'))}, E_max {_fmt(cal.get('e_max'))}, slope {_fmt(cal.get('slope'))}, "
                  f"observed/expected {_fmt(cal.get('oe_ratio'))}."]
    elif cal and isinstance(cal.get("prob_true"), list):
        lines += _table(["mean predicted", "fraction positive", "patients"],
                        [[_fmt(p), _fmt(t), _count(c)] for p, t, c in
                         zip(cal.get("prob_pred", []), cal["prob_true"], cal.get("counts", []))])
        lines += ["", f"ECE {_fmt(cal.get('ece'))}."]
    elif cal and isinstance(cal.get("per_class"), dict):
        lines += _table(["class", "ECE"], [[c, _fmt(_get(v, "ece"))] for c, v in cal["per_class"].items()])
        lines += ["", f"Top-label ECE {_fmt(cal.get('ece'))}, class-wise ECE {_fmt(cal.get('classwise_ece'))}."]
    else:
        lines.append(NOT_COMPUTED)
    lines.append("")

    lines += ["### Confounder probes", ""]
    probes = _probe_aucs(metrics)
    if probes:
        lines += ["AUC of a classifier predicting each confounder from the fused embedding "
                  "(0.5 = the embedding carries no information about it).", ""]
        lines += _table(["confounder", "probe AUC"], [[k, _fmt(v)] for k, v in probes.items()])
    else:
        lines.append(NOT_COMPUTED)
    lines.append("")
    notes = metrics.get("notes")
    if isinstance(notes, list) and notes:
        lines += ["### Evaluation notes", ""] + [f"- {_cell(n)}" for n in notes if isinstance(n, str)] + [""]
    return lines


ETHICS = [
    "## Ethical considerations",
    "",
    "- Privacy: trained on pseudonymised data; this card reports aggregate counts only. Model outputs and "
    "explanations must not be used to re-identify patients.",
    "- Fairness: performance can differ between sites, scanners and patient groups (see the per-site table "
    "and the confounder probes); check subgroups relevant to the target population before any use.",
    "- Risk of harm: a wrong risk estimate could delay or intensify treatment if used clinically; the model "
    "is for research only and must not replace clinical judgement.",
    "",
]

LIMITATIONS = [
    "## Limitations",
    "",
    "- Retrospective evaluation only; no prospective or interventional validation.",
    "- Metrics are estimated on a finite test set; see the confidence intervals. Time-dependent metrics are "
    "only valid within the follow-up of both training and test patients.",
    "- Survival probabilities assume proportional hazards (Breslow baseline hazard on the training patients).",
    "- Missing modalities are handled by the fusion strategy; patients missing modalities more often than "
    "in training may be predicted less well.",
    "",
]


def write_model_card(path, *, config: dict, metrics: dict, cohort_summary: dict,
                     intended_use: str | None = None) -> Path:
    """Write ``model_card.md`` and return its path.

    Parameters
    ----------
    path : str or Path
        A ``.md`` file, or a folder (the card is written as
        ``<folder>/model_card.md``; the folder is created).
    config : dict
        The resolved experiment config (``ExperimentConfig.model_dump()`` or a
        pydantic config): ``name``, ``seed``, ``task.kind``, ``fusion.*``,
        ``modalities.<m>.encoder/out_dim``, ``training.*``, ``adversary.*``,
        ``split.scheme``.
    metrics : dict
        :func:`fusion.evaluation.survival_metrics` or
        :func:`~fusion.evaluation.classification_metrics` output, optionally
        with ``per_site`` (rows of :func:`~fusion.evaluation.per_group_table`),
        ``confounder_probe_auc`` (``{name: auc}``) and ``ci``
        (``{metric: [lo, hi]}``).
    cohort_summary : dict
        Counts: ``n_patients``, ``n_events``, ``splits`` (``{split: n}`` or
        ``{split: {"n", "n_events"}}``), ``sites`` (``{site: n}`` or
        ``{site: {"n", "n_events", "n_test"}}``), ``modalities``
        (``{m: missing_rate}`` or ``{m: {"n_present", "n_missing" |
        "missing_rate"}}``).  Other keys are ignored.
    intended_use : str, optional
        Replaces the default intended-use text (research use only, not a
        medical device, populations like the training cohort).

    Returns
    -------
    Path
        The written file.
    """
    config, metrics, cohort = _as_dict(config), _as_dict(metrics), _as_dict(cohort_summary)
    path = Path(path)
    if path.suffix.lower() != ".md":
        path = path / "model_card.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    task = _task(config, metrics)

    lines = [f"# Model card: {_cell(_get(config, 'name', default='experiment'))}", "",
             f"Generated by radfusion on {_dt.date.today().isoformat()}, following Mitchell et al. (2019), "
             "\"Model Cards for Model Reporting\".", ""]
    lines += _model_details(config, task)
    lines += ["## Intended use", "", (intended_use or DEFAULT_INTENDED_USE).strip(), "", OUT_OF_SCOPE, ""]
    confs = _get(config, "data", "confounders", default=[]) or []
    lines += ["## Factors", "",
              "Performance is reported per site; confounders considered: "
              + (", ".join(_cell(c) for c in confs) if isinstance(confs, list) and confs else "none recorded")
              + ".", ""]
    lines += _data_section(cohort)
    lines += _metrics_section(metrics, task)
    lines += ETHICS
    caveats = data_driven_caveats(metrics, cohort, task=task)
    lines += ["## Caveats and recommendations", ""]
    lines += [f"- {c}" for c in caveats] if caveats else ["- No data-driven caveat was triggered."]
    lines += ["- Validate externally on the intended population before drawing conclusions.", ""]
    lines += LIMITATIONS
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
