"""The self-contained study report: ``RUNDIR/report.html``.

:func:`write_report` reads only the run folder's files (``metrics.json``,
``config.yaml``, ``predictions/``, ``models/<name>/history.csv``,
``saliency/summary.json`` and its PNG overlays) and writes one HTML file with
plotly.js and every image inlined: no remote resource, readable offline.
Every user string (subject ids, center names, file names) is HTML-escaped by
jinja2's autoescape; figures are embedded with plotly's own JSON (which
escapes ``<``, ``>`` and ``&``). Sections are described in ``docs/report.md``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nhb_core import figures as F
from nhb_core.errors import RunError
from nhb_core.fileio import atomic_write_text, read_json
from nhb_core.runs import RunFolder

#: Bump when the report's content changes (part of the study's report-stage cache key).
REPORT_VERSION = 2

THRESHOLD_KEYS = ["accuracy", "sensitivity", "specificity", "precision", "npv", "f1"]

# (checklist, topic, section id, how the report answers it). "author" = the manuscript must answer it.
CHECKLIST = [
    ("CLAIM 2024 / TRIPOD+AI", "Title and abstract identify a deep-learning diagnostic study", None,
     "author: the report names the task, models and sets in its header"),
    ("CLAIM 2024 / TRIPOD+AI", "Data sources, centers, dates of the cohort", "cohort",
     "table 1 by center and group; manifest path and hash in provenance"),
    ("CLAIM 2024 / TRIPOD+AI", "Eligibility criteria and reference standard (ground truth)", "provenance",
     "label column and NBNA threshold of the manifest check (config: validate); the clinical definition is the author's"),
    ("CLAIM 2024 / TRIPOD+AI", "Data pre-processing and selection of slices", "provenance",
     "prepare options (crop, size, slice selection, normalisation) in the config block"),
    ("CLAIM 2024 / TRIPOD+AI", "Data partitions and the level of the split (patient vs image)", "flow",
     "flow diagram, split unit and the leakage banner when the split was slice-level"),
    ("CLAIM 2024 / TRIPOD+AI", "Flow of participants and images through the study", "flow",
     "subjects and slices per set"),
    ("CLAIM 2024 / TRIPOD+AI", "Demographic and clinical characteristics per partition", "cohort", "table 1"),
    ("CLAIM 2024 / TRIPOD+AI", "Model description (architecture, inputs, outputs)", "provenance",
     "model table: architecture, input size and channels, threshold"),
    ("CLAIM 2024 / TRIPOD+AI", "Training details: initialisation, hyper-parameters, epochs, stopping, model selection",
     "training", "training curves; train options and seeds in provenance"),
    ("CLAIM 2024 / TRIPOD+AI", "Operating threshold and how it was chosen", "threshold",
     "Youden threshold on the validation set (subject level), shown per model"),
    ("CLAIM 2024 / TRIPOD+AI", "Performance metrics with measures of uncertainty", "auc",
     "AUC with DeLong and bootstrap 95% CIs, clustered AUC for slices"),
    ("CLAIM 2024 / TRIPOD+AI", "Statistical comparison of models and with human readers", "auc",
     "DeLong p-value matrix; McNemar tests against each reader (threshold section)"),
    ("CLAIM 2024 / TRIPOD+AI", "Diagnostic accuracy at the operating point (sensitivity, specificity, ...)", "threshold",
     "threshold metrics with Wilson CIs and confusion matrices"),
    ("CLAIM 2024 / TRIPOD+AI", "Calibration and clinical utility", "calibration",
     "reliability diagrams, calibration intercept/slope, Brier score, decision curves"),
    ("CLAIM 2024 / TRIPOD+AI", "External validation (performance per site)", "roc", "ROC and metrics per center"),
    ("CLAIM 2024 / TRIPOD+AI", "Unit of analysis and clustering (slices within a subject)", "levels",
     "slice-level and subject-level results side by side"),
    ("CLAIM 2024", "Explainability / saliency methods and failure analysis", "gradcam",
     "Grad-CAM overlays of correct and wrong cases per model, energy in the GP ROI"),
    ("CLAIM 2024 / TRIPOD+AI", "Software, versions, code and reproducibility", "provenance",
     "package versions, git commit, seeds, data hashes, the full config"),
    ("CLAIM 2024 / TRIPOD+AI", "Fairness, subgroup performance beyond site", None,
     "author: not computed by this report (per-site results only)"),
    ("CLAIM 2024 / TRIPOD+AI", "Ethics approval, registration, funding, data availability", None, "author"),
]


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, Mapping):
        return _fmt_ci(v.get("value"), v.get("ci"), digits)
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}" if v == v else "n/a"
    return str(v)


def _fmt_ci(v: Any, ci: Any, digits: int = 3) -> str:
    s = _fmt(v, digits)
    if s != "n/a" and ci and len(ci) == 2 and ci[0] is not None and ci[1] is not None:
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def _fmt_p(p: Any) -> str:
    if p is None:
        return "n/a"
    p = float(p)
    if p != p:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _ordered_sets(metrics: Mapping[str, Any]) -> list[str]:
    sets = list((metrics.get("sets") or {}).keys())
    key = {"test": 0, "pooled": 7, "val": 9}
    return sorted(sets, key=lambda s: (key.get(s, 1 if s.startswith("external:") else 5), s))


class _Figs:
    """Collects figure HTML snippets with stable div ids."""

    def __init__(self) -> None:
        self.n = 0

    def html(self, fig: Any) -> str:
        self.n += 1
        return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{self.n}",
                           default_height=f"{fig.layout.height or 400}px",
                           config={"displaylogo": False, "responsive": True})


def _img_data_uri(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _load_saliency(run_dir: Path) -> dict[str, Any] | None:
    p = RunFolder(run_dir).saliency_summary_path
    if not p.exists():
        return None
    data = read_json(p)
    for blk in (data.get("models") or {}).values():
        for case in blk.get("cases") or []:
            png = case.get("png")
            case["img"] = None
            if png:
                f = (run_dir / "saliency" / png).resolve()
                if (run_dir / "saliency").resolve() in f.parents:  # never read outside the run
                    case["img"] = _img_data_uri(f)
    return data


def build_context(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything the template shows, read from the run folder (figures as HTML snippets)."""
    import plotly

    run_dir = Path(run_dir)
    rf = RunFolder(run_dir)
    mpath = rf.metrics_path
    if not mpath.exists():
        raise RunError(run_dir, "the run has no metrics.json", "Finish the study (python -m nhb_core study ...) first")
    metrics = read_json(mpath)
    run = metrics.get("run") or {}
    models = F.models_of(metrics)
    readers = list(run.get("readers") or [])
    sets = _ordered_sets(metrics)
    figs = _Figs()
    seeds = None
    if rf.seeds_path.is_file():
        try:
            seeds = read_json(rf.seeds_path)
        except (OSError, ValueError):
            seeds = None
    seeds_sets = [x for x in sets if seeds and x in (seeds.get("sets") or {})]
    seeds_models = list(dict.fromkeys(m for x in seeds_sets for m in seeds["sets"][x])) if seeds else []
    ctx: dict[str, Any] = {"metrics": metrics, "run": run, "models": models, "sets": sets, "readers": readers,
                           "seeds": seeds, "seeds_sets": seeds_sets, "seeds_models": seeds_models,
                           "fig_seeds": figs.html(F.seeds_figure(seeds)) if seeds else "",
                           "leaky": bool(metrics.get("leaky")), "n_shared": metrics.get("n_shared_subjects"),
                           "set_label": F.set_label, "fmt": _fmt, "fmt_ci": _fmt_ci, "fmt_p": _fmt_p,
                           "plotly_version": plotly.__version__}
    cohort = metrics.get("cohort") or {}
    t1 = cohort.get("table1") or []
    ctx["table1_cols"] = list(dict.fromkeys(k for row in t1 for k in row))
    ctx["table1"] = t1
    ctx["flow"] = cohort.get("flow") or {}
    ctx["fig_flow"] = figs.html(F.flow_figure(ctx["flow"])) if ctx["flow"] else None
    ctx["fig_auc_bar"] = figs.html(F.auc_bar_figure(metrics, "subject"))

    per_set = []
    for s in sets:
        entry: dict[str, Any] = {"name": s, "label": F.set_label(s), "levels": {}}
        entry["mrmc"] = ((metrics.get("sets") or {}).get(s) or {}).get("mrmc")  # reader study (MRMC), if any
        entry["fig_mrmc"] = figs.html(F.mrmc_figure(metrics, s)) if (entry["mrmc"] or {}).get("comparisons") else None
        for level in ("subject", "slice"):
            blk = F.level_block(metrics, s, level)
            if not blk:
                continue
            entry["levels"][level] = blk
        entry["roc_subject"] = figs.html(F.roc_figure(metrics, s, "subject"))
        entry["roc_slice"] = figs.html(F.roc_figure(metrics, s, "slice", show_readers=False)) \
            if "slice" in entry["levels"] else None
        entry["delong"] = F.delong_matrix(metrics, s, "subject")
        pred = rf.load_predictions(s, "subject")
        if entry["levels"].get("subject"):
            entry["fig_confusion"] = figs.html(F.confusion_figure(metrics, s, "subject", pred=pred))
            entry["fig_calibration"] = figs.html(F.calibration_figure(metrics, s, "subject", pred=pred))
            entry["fig_decision"] = figs.html(F.decision_curve_figure(metrics, s, "subject", pred=pred))
        per_set.append(entry)
    ctx["per_set"] = per_set
    ctx["threshold_keys"] = THRESHOLD_KEYS
    histories = rf.histories(models)
    ctx["fig_training"] = figs.html(F.training_figure(histories, models))
    ctx["saliency"] = _load_saliency(run_dir)
    cfg_path = rf.config_path
    ctx["config_yaml"] = cfg_path.read_text(encoding="utf-8") if cfg_path.exists() else json.dumps(run.get("config"), indent=2)
    ctx["checklist"] = CHECKLIST
    ctx["plotly_js"] = plotly.offline.get_plotlyjs()
    ctx["n_figures"] = figs.n
    return ctx


TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:; connect-src 'none'">
<title>NHB Lab report: {{ run.name }}</title>
<style>
 body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222; background: #fafafa; }
 header { background: #12355b; color: #fff; padding: 18px 28px; }
 header h1 { margin: 0 0 4px 0; font-size: 22px; }
 nav { background: #e8eef5; padding: 8px 28px; font-size: 13px; position: sticky; top: 0; z-index: 10; }
 nav a { margin-right: 12px; color: #12355b; }
 main { padding: 8px 28px 40px 28px; max-width: 1400px; }
 section { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: 12px 18px; margin: 16px 0; }
 h2 { font-size: 18px; margin: 4px 0 10px 0; color: #12355b; }
 h3 { font-size: 15px; margin: 14px 0 6px 0; }
 table { border-collapse: collapse; font-size: 12.5px; margin: 6px 0 12px 0; }
 th, td { border: 1px solid #d8d8d8; padding: 3px 7px; text-align: left; vertical-align: top; }
 th { background: #f0f3f7; }
 td.num { text-align: right; font-variant-numeric: tabular-nums; }
 .banner { background: #fdecea; border: 2px solid #c62828; color: #8e1b1b; padding: 10px 16px; border-radius: 6px; margin: 14px 0; font-weight: 600; }
 .note { color: #555; font-size: 12.5px; }
 .grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
 .grid3 { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 10px; }
 .case { border: 1px solid #ddd; border-radius: 4px; padding: 4px; font-size: 11.5px; }
 .case img { width: 100%; image-rendering: pixelated; }
 .ok { color: #1b5e20; } .bad { color: #b71c1c; }
 pre { background: #f4f4f4; padding: 8px; font-size: 12px; overflow-x: auto; }
 @media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } }
</style>
<script>{{ plotly_js | safe }}</script>
</head>
<body>
<header>
 <h1>NHB Lab study report: {{ run.name }}</h1>
 <div>T1WI deep learning for brain injury in neonatal hyperbilirubinemia &middot; models: {{ models | join(", ") }}
  &middot; split unit: {{ run.split_unit or "subject" }} &middot; created {{ run.created }}</div>
</header>
<nav>
 <a href="#cohort">cohort</a><a href="#flow">flow</a><a href="#roc">ROC</a><a href="#auc">AUC &amp; DeLong</a>
 <a href="#threshold">threshold &amp; readers</a><a href="#confusion">confusion</a><a href="#calibration">calibration &amp; decision</a>
 {% if seeds %}<a href="#seeds">seeds</a>{% endif %}<a href="#levels">slice vs subject</a><a href="#gradcam">Grad-CAM</a><a href="#training">training</a>
 <a href="#provenance">provenance</a><a href="#checklist">CLAIM / TRIPOD+AI</a>
</nav>
<main>
{% if leaky %}
<div class="banner" id="leakage-banner">Leakage warning: this run split the data at the <b>slice</b> level, so slices of the
 same neonate appear in both training and test sets{% if n_shared is not none %} ({{ n_shared }} subjects shared){% endif %}.
 Its test AUCs are optimistic and must not be reported as the model's performance. Rerun with a subject-level split.</div>
{% endif %}

<section id="summary">
<h2>Summary</h2>
{{ fig_auc_bar | safe }}
<p class="note">AUC at the subject level (slice probabilities averaged per subject) with 95% DeLong confidence intervals.
{% if metrics.oracle_auc %}Oracle AUC: the best AUC any model could reach on this synthetic cohort
 ({% for c, v in metrics.oracle_auc.items() %}center {{ c }}: {{ fmt(v) }}{% if not loop.last %}, {% endif %}{% endfor %}).{% endif %}
{% if metrics.visible_auc %}Image-visible signal AUC, the ceiling an image model can approach
 ({% for c, v in metrics.visible_auc.items() %}center {{ c }}: {{ fmt(v) }}{% if not loop.last %}, {% endif %}{% endfor %}).{% endif %}</p>
</section>

<section id="cohort">
<h2>Cohort (table 1)</h2>
<table><thead><tr>{% for c in table1_cols %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in table1 %}<tr>{% for c in table1_cols %}<td{% if row[c] is number %} class="num"{% endif %}>{{ row[c] if row[c] is not none else "" }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
<p class="note">Continuous covariates: mean ± SD; categorical: count (percent). Also in tables/cohort.csv.</p>
</section>

<section id="flow">
<h2>Flow of subjects and slices</h2>
{% if fig_flow %}{{ fig_flow | safe }}{% endif %}
<table><thead><tr><th>set</th><th>subjects</th><th>positive subjects</th><th>slices</th><th>centers</th></tr></thead><tbody>
<tr><td>prepared dataset</td><td class="num">{{ flow.dataset.subjects }}</td><td></td><td class="num">{{ flow.dataset.slices }}</td><td>{{ flow.dataset.centers | join(", ") }}</td></tr>
{% for s, v in flow.sets.items() %}<tr><td>{{ set_label(s) }}</td><td class="num">{{ v.subjects }}</td><td class="num">{{ v.positives }}</td><td class="num">{{ v.slices }}</td><td>{{ v.centers | join(", ") }}</td></tr>{% endfor %}
</tbody></table>
<p class="note">Split unit: <b>{{ run.split_unit or "subject" }}</b>{% if n_shared is not none %}; subjects with slices in more than one set: {{ n_shared }}{% endif %}.</p>
</section>

<section id="roc">
<h2>ROC curves per site</h2>
<p class="note">Left: subject level (with reader operating points and the model's threshold, open circles); right: slice level. Shaded: 95% confidence band.</p>
{% for e in per_set %}
<h3 id="roc-{{ loop.index }}">{{ e.label }}</h3>
<div class="grid2"><div>{{ e.roc_subject | safe }}</div><div>{% if e.roc_slice %}{{ e.roc_slice | safe }}{% endif %}</div></div>
{% endfor %}
</section>

<section id="auc">
<h2>AUC and DeLong comparisons</h2>
{% for e in per_set %}{% set blk = e.levels.get("subject") %}{% if blk %}
<h3>{{ e.label }} (subject level, n={{ blk.n }}, {{ blk.n_pos }} positive)</h3>
<table><thead><tr><th>model</th><th>AUC [95% CI DeLong]</th><th>AUC [95% CI bootstrap]</th><th>Brier</th></tr></thead><tbody>
{% for m, mm in blk.models.items() %}<tr><td>{{ m }}</td><td class="num">{{ fmt_ci(mm.auc, mm.auc_ci_delong) }}</td><td class="num">{{ fmt_ci(mm.auc, mm.auc_ci_bootstrap) }}</td><td class="num">{{ fmt(mm.brier) }}</td></tr>{% endfor %}
</tbody></table>
{% set names, pm = e.delong %}{% if names | length > 1 %}
<table><thead><tr><th>DeLong p</th>{% for n in names %}<th>{{ n }}</th>{% endfor %}</tr></thead><tbody>
{% for i in range(names | length) %}<tr><th>{{ names[i] }}</th>{% for j in range(names | length) %}<td class="num">{% if i != j %}{{ fmt_p(pm[i][j]) }}{% else %}&mdash;{% endif %}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>
{% if blk.comparisons %}<table><thead><tr><th>a</th><th>b</th><th>AUC difference [95% CI]</th><th>z</th><th>p</th></tr></thead><tbody>
{% for c in blk.comparisons %}<tr><td>{{ c.a }}</td><td>{{ c.b }}</td><td class="num">{{ fmt_ci(c.auc_diff, c.ci) }}</td><td class="num">{{ fmt(c.delong_z, 2) }}</td><td class="num">{{ fmt_p(c.delong_p) }}</td></tr>{% endfor %}
</tbody></table>{% endif %}
{% endif %}{% endif %}{% endfor %}
</section>

{% if seeds %}
<section id="seeds">
<h2>Repeated seeds</h2>
<p class="note">The study repeated with seeds {{ seeds.seeds | join(", ") }} (split and training seeded alike):
 subject-level AUC, mean &plusmn; SD (min&ndash;max) over {{ seeds.seeds | length }} runs. A difference between models
 smaller than this spread is not a finding.</p>
<table><thead><tr><th>model</th>{% for s in seeds_sets %}<th>{{ set_label(s) }}</th>{% endfor %}</tr></thead><tbody>
{% for m in seeds_models %}<tr><td>{{ m }}</td>{% for s in seeds_sets %}{% set v = seeds.sets[s].get(m) %}<td class="num">{% if v %}{{ fmt(v.mean) }} &plusmn; {{ fmt(v.sd) }} ({{ fmt(v.min) }}&ndash;{{ fmt(v.max) }}){% else %}&mdash;{% endif %}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>
{{ fig_seeds | safe }}
</section>
{% endif %}

<section id="threshold">
<h2>Threshold metrics and readers</h2>
<p class="note">At each model's threshold (Youden on the validation set, subject level); 95% Wilson CIs; the accuracy at the conventional 0.5 and the calibration slope (1 = calibrated; probabilities are prior-corrected for the class-balanced loss, docs/training.md) beside them. McNemar exact p-values compare each model's calls with each reader's on the same subjects.</p>
{% for e in per_set %}{% set blk = e.levels.get("subject") %}{% if blk %}
<h3>{{ e.label }}</h3>
<table><thead><tr><th>model / reader</th><th>threshold</th>{% for k in threshold_keys %}<th>{{ k }}</th>{% endfor %}<th>accuracy at 0.5</th><th>calibration slope</th></tr></thead><tbody>
{% for m, mm in blk.models.items() %}<tr><td>{{ m }}</td><td class="num">{{ fmt(mm.threshold) }}</td>{% for k in threshold_keys %}<td class="num">{{ fmt(mm[k]) if mm[k] is defined else "" }}</td>{% endfor %}<td class="num">{% set a5 = mm.get("at_0.5") %}{{ fmt(a5.accuracy) if a5 else "" }}</td><td class="num">{{ fmt((mm.calibration or {}).get("slope")) }}</td></tr>{% endfor %}
{% for r, rr in (blk.readers or {}).items() %}<tr><td><i>{{ r }}</i></td><td></td>{% for k in threshold_keys %}<td class="num">{{ fmt(rr[k]) if rr[k] is defined else "" }}</td>{% endfor %}<td></td><td></td></tr>{% endfor %}
</tbody></table>
{% if blk.readers %}<table><thead><tr><th>reader</th><th>model</th><th>McNemar p (calls)</th><th>McNemar p (sensitivity)</th><th>McNemar p (specificity)</th><th>precision difference [95% CI]</th><th>p</th></tr></thead><tbody>
{% for r, rr in blk.readers.items() %}{% for m, vs in (rr.vs or {}).items() %}<tr><td>{{ r }}</td><td>{{ m }}</td><td class="num">{{ fmt_p(vs.mcnemar_p) }}</td>
<td class="num">{{ fmt_p(vs.mcnemar_p_sensitivity) }}</td><td class="num">{{ fmt_p(vs.mcnemar_p_specificity) }}</td>
<td class="num">{{ fmt_ci(vs.precision_diff, vs.precision_diff_ci) }}</td><td class="num">{{ fmt_p(vs.precision_p) }}</td></tr>{% endfor %}{% endfor %}
</tbody></table>{% endif %}
{% endif %}{% endfor %}
</section>

{% if per_set | selectattr("mrmc") | list %}
<section id="mrmc">
<h2>Reader study: networks versus readers (MRMC)</h2>
<p class="note">Obuchowski-Rockette analysis with Hillis degrees of freedom: readers and cases are random samples (RRRC); a network is a modality whose rating (its subject-level probability) is the same for every reader. Difference = first minus second; p for fixed readers (FRRC) and fixed cases (RRFC) for information. Empirical AUC; error covariance by the method named.</p>
{% for e in per_set %}{% if e.mrmc %}{% set mr = e.mrmc %}
<h3>{{ e.label }} ({{ mr.n_cases }} subjects read, {{ mr.n_pos }} positive; readers: {{ mr.readers | join(", ") }}; covariance: {{ mr.cov_method }})</h3>
{% if e.fig_mrmc %}{{ e.fig_mrmc | safe }}{% endif %}
{% if mr.comparisons %}<table><thead><tr><th>comparison</th><th>AUC first</th><th>AUC second (reader mean)</th><th>difference [95% CI]</th><th>F (1, ddf)</th><th>p (RRRC)</th><th>p (FRRC)</th><th>p (RRFC)</th></tr></thead><tbody>
{% for name, res in mr.comparisons.items() %}{% set a = res.modalities[0] %}{% set b = res.modalities[1] %}<tr><td>{{ name }}</td><td class="num">{{ fmt(res.modality_auc[a]) }}</td><td class="num">{{ fmt(res.modality_auc[b]) }}</td>
<td class="num">{{ fmt_ci(res.RRRC.diff.estimate, [res.RRRC.diff.ci_lower, res.RRRC.diff.ci_upper]) }}</td><td class="num">{{ fmt(res.RRRC.F, 2) }} (1, {{ fmt(res.RRRC.df2, 1) }})</td>
<td class="num">{{ fmt_p(res.RRRC.p) }}</td><td class="num">{{ fmt_p(res.FRRC.p) }}</td><td class="num">{{ fmt_p(res.RRFC.p) }}</td></tr>{% endfor %}
</tbody></table>{% endif %}
{% for n in mr.notes %}<p class="note">{{ n }}</p>{% endfor %}
{% endif %}{% endfor %}
</section>
{% endif %}

<section id="confusion">
<h2>Confusion matrices</h2>
{% for e in per_set %}{% if e.fig_confusion %}{{ e.fig_confusion | safe }}{% endif %}{% endfor %}
</section>

<section id="calibration">
<h2>Calibration and decision curves</h2>
{% for e in per_set %}{% if e.fig_calibration %}<div class="grid2"><div>{{ e.fig_calibration | safe }}</div><div>{{ e.fig_decision | safe }}</div></div>{% endif %}{% endfor %}
</section>

<section id="levels">
<h2>Slice-level and subject-level results</h2>
<p class="note">Slices of one neonate are not independent: slice-level CIs that ignore clustering are too narrow. The clustered AUC (Obuchowski) accounts for it.</p>
<table><thead><tr><th>set</th><th>model</th><th>subject AUC [95% CI]</th><th>n subjects</th><th>slice AUC [95% CI, naive]</th><th>slice AUC clustered</th><th>n slices</th></tr></thead><tbody>
{% for e in per_set %}{% set sb = e.levels.get("subject") or {} %}{% set sl = e.levels.get("slice") or {} %}
{% for m in models %}{% set a = (sb.models or {}).get(m) or {} %}{% set b = (sl.models or {}).get(m) or {} %}
<tr><td>{{ e.label }}</td><td>{{ m }}</td><td class="num">{{ fmt_ci(a.auc, a.auc_ci_delong) }}</td><td class="num">{{ sb.n }}</td>
<td class="num">{{ fmt_ci(b.auc, b.auc_ci_delong) }}</td><td class="num">{{ fmt(b.auc_clustered) }}</td><td class="num">{{ sl.n }}</td></tr>
{% endfor %}{% endfor %}
</tbody></table>
</section>

<section id="gradcam">
<h2>Grad-CAM: correct and wrong cases</h2>
{% if saliency %}
<p class="note">Method: {{ saliency.method }}. Each tile: the slice with the map overlaid (ROI outline where drawn), truth, probability and the share of CAM energy inside the GP ROI.</p>
{% for m, blk in (saliency.models or {}).items() %}
<h3>{{ m }}</h3>
{% if blk.summary %}<p class="note">{% for k, v in blk.summary.items() if v is not mapping %}{{ k }}: {{ fmt(v) }}{% if not loop.last %}; {% endif %}{% endfor %}</p>{% endif %}
<div class="grid3">{% for c in blk.cases or [] %}<div class="case">
{% if c.img %}<img src="{{ c.img }}" alt="Grad-CAM {{ m }} {{ c.subject_id }}">{% endif %}
<div class="{{ 'ok' if c.correct else 'bad' }}"><b>{{ "correct" if c.correct else "wrong" }}</b> &middot; {{ c.set | default("") }}</div>
<div>{{ c.subject_id }} slice {{ c.slice_index }} &middot; label {{ c.label }} &middot; p={{ fmt(c.prob) }}</div>
{% if c.roi_energy is defined and c.roi_energy is not none %}<div>energy in ROI: {{ fmt(c.roi_energy, 2) }}</div>{% endif %}
</div>{% endfor %}</div>
{% endfor %}
{% else %}<p class="note">No saliency maps in this run (saliency stage disabled).</p>{% endif %}
</section>

<section id="training">
<h2>Training curves</h2>
{{ fig_training | safe }}
<table><thead><tr><th>model</th><th>architecture</th><th>input</th><th>best epoch</th><th>val AUC</th><th>threshold</th></tr></thead><tbody>
{% for m, info in (run.models or {}).items() %}<tr><td>{{ m }}</td><td>{{ info.architecture or info.timm_name or "" }}</td><td>{{ info.in_chans }} ch, {{ (info.input_size or []) | join(" x ") }}</td><td class="num">{{ info.best_epoch }}</td><td class="num">{{ fmt(info.val_auc) }}</td><td class="num">{{ fmt(info.threshold) }}</td></tr>{% endfor %}
</tbody></table>
</section>

<section id="provenance">
<h2>Provenance</h2>
<table><tbody>
<tr><th>run</th><td>{{ run.name }}</td></tr>
<tr><th>created</th><td>{{ run.created }}</td></tr>
<tr><th>manifest</th><td>{{ run.manifest }}</td></tr>
<tr><th>seed</th><td>{{ run.seed }}</td></tr>
<tr><th>git commit</th><td>{{ run.git_commit or "n/a" }}</td></tr>
{% for k, v in (run.versions or {}).items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}
<tr><th>plotly.js (inlined)</th><td>{{ plotly_version }}</td></tr>
{% for k, v in (run.sha256 or {}).items() %}{% if v is mapping %}{% for kk, vv in v.items() %}<tr><th>sha256 {{ k }}/{{ kk }}</th><td><code>{{ vv }}</code></td></tr>{% endfor %}{% else %}<tr><th>sha256 {{ k }}</th><td><code>{{ v }}</code></td></tr>{% endif %}{% endfor %}
</tbody></table>
<h3>config.yaml</h3>
<pre>{{ config_yaml }}</pre>
<p class="note">Every number in this report is also in metrics.json and tables/*.csv of the run folder; predictions in predictions/*.csv.</p>
</section>

<section id="checklist">
<h2>CLAIM 2024 / TRIPOD+AI: where this report answers each item</h2>
<table><thead><tr><th>checklist</th><th>item</th><th>where</th><th>how</th></tr></thead><tbody>
{% for cl, item, sec, how in checklist %}<tr><td>{{ cl }}</td><td>{{ item }}</td><td>{% if sec %}<a href="#{{ sec }}">{{ sec }}</a>{% else %}&mdash;{% endif %}</td><td>{{ how }}</td></tr>{% endfor %}
</tbody></table>
</section>
</main>
</body>
</html>
"""


def render_report(run_dir: str | os.PathLike) -> str:
    """The report's HTML text (see :func:`write_report`)."""
    import jinja2

    ctx = build_context(run_dir)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined, trim_blocks=False)
    env.tests["mapping"] = lambda v: isinstance(v, Mapping)
    return env.from_string(TEMPLATE).render(**ctx)


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the self-contained ``report.html`` of a finished run.

    Parameters
    ----------
    run_dir : path
        A run folder with ``metrics.json`` (written by the study's stats stage).
    out : path or None
        Destination (default ``run_dir/report.html``), written atomically.

    Returns
    -------
    Path
        The report's path.
    """
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    atomic_write_text(out, render_report(run_dir))
    return out


__all__ = ["write_report", "render_report", "build_context", "CHECKLIST", "REPORT_VERSION"]
