"""``python -m nhb_core stats``: AUC, DeLong/bootstrap CIs, paired DeLong, clustered AUC and
model-versus-reader tests over a predictions CSV (schema of --json: docs/stats.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from nhb_core.cli import app


def _fmt(x, nd=3) -> str:
    if x is None:
        return "-"
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    if xf != xf:
        return "-"
    return f"{xf:.{nd}f}"


def _ci(c, nd=3) -> str:
    if not c:
        return "-"
    return f"[{_fmt(c[0], nd)}, {_fmt(c[1], nd)}]"


def _p(p) -> str:
    if p is None or p != p:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


@app.command("stats")
def stats_command(
    predictions: Path = typer.Option(..., "--predictions", help="Predictions CSV (one row per case or slice)."),
    truth: str = typer.Option(..., "--truth", help="Truth column (1 = positive, 0 = negative)."),
    score: list[str] = typer.Option(..., "--score", help="Score column (higher = positive); repeat for each model."),
    cluster: str | None = typer.Option(None, "--cluster", help="Cluster (subject) column for slice rows: "
                                          "adds Obuchowski's clustered AUC and a cluster bootstrap."),
    reader: list[str] = typer.Option([], "--reader", help="0/1 reader column; repeat for several readers."),
    threshold: float | None = typer.Option(None, "--threshold", help="Fixed threshold (positive when "
                                              "score >= threshold), chosen in advance on validation data."),
    n_boot: int = typer.Option(2000, "--n-boot", min=1, help="Bootstrap replicates."),
    seed: int = typer.Option(0, "--seed", help="Seed of every bootstrap draw."),
    level: float = typer.Option(0.95, "--level", help="Confidence level."),
    aggregate: str = typer.Option("mean", "--aggregate", help="With --cluster: how slice scores make a "
                                  "subject score for the subject-level AUC (mean, median, max)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout (docs/stats.md)."),
) -> None:
    """Statistics of one predictions CSV: AUC with DeLong and bootstrap CIs, paired DeLong between
    every pair of scores, clustered AUC (--cluster), threshold metrics (--threshold) and exact
    McNemar tests against readers (--reader)."""
    from nhb_core import stats
    from nhb_core.errors import StatsInputError
    from nhb_core.fileio import to_json

    if not 0 < level < 1:
        raise StatsInputError("--level", f"confidence level {level} is not between 0 and 1", "Use e.g. 0.95")
    if aggregate not in ("mean", "median", "max"):
        raise StatsInputError("--aggregate", f"unknown aggregation '{aggregate}'", "Use mean, median or max")
    if threshold is not None and threshold != threshold:
        raise StatsInputError("--threshold", "threshold is not a number", "Give a number such as 0.5")
    df = stats.load_predictions(predictions, truth, score, cluster, reader)
    res = stats.analyze_predictions(df, truth, score, cluster, reader, threshold, n_boot=n_boot, seed=seed,
                                    level=level, source=str(predictions), aggregate=aggregate)
    res = {"file": str(predictions), "truth": truth, **res}
    if as_json:
        typer.echo(to_json(res, indent=None))
        return
    _print_tables(res)


def _print_tables(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    lv = int(round(res["level"] * 100))
    con.print(f"[bold]{res['file']}[/]: n = {res['n']} ({res['n_pos']} positive, {res['n_neg']} negative)"
              + (f", {res['n_clusters']} clusters" if res.get("n_clusters") else ""))
    t = Table(title=f"AUC ({lv}% CI)")
    for c in ("score", "AUC", "DeLong CI", "bootstrap CI"):
        t.add_column(c)
    clustered = res.get("n_clusters") is not None
    if clustered:
        t.add_column("clustered CI (Obuchowski)")
        t.add_column("cluster bootstrap CI")
    for s, e in res["scores"].items():
        row = [s, _fmt(e["auc"]), _ci(e["auc_ci_delong"]), _ci(e["auc_ci_bootstrap"])]
        if clustered:
            row += [_ci(e.get("auc_clustered_ci")), _ci(e.get("auc_ci_cluster_bootstrap"))]
        t.add_row(*row)
    con.print(t)
    sl = res.get("subject_level")
    if sl and sl.get("scores"):
        t = Table(title=f"Subject level ({sl['aggregate']} of slice scores; n = {sl['n']}, {sl['n_pos']} positive)")
        for c in ("score", "AUC", "DeLong CI", "bootstrap CI"):
            t.add_column(c)
        for s, e in sl["scores"].items():
            t.add_row(s, _fmt(e["auc"]), _ci(e["auc_ci_delong"]), _ci(e["auc_ci_bootstrap"]))
        con.print(t)
    elif sl:
        con.print(f"Subject level: {sl.get('note')}")
    if res["comparisons"]:
        t = Table(title="Paired DeLong comparisons (a - b)")
        for c in ("a", "b", "AUC diff", f"{lv}% CI", "z", "p"):
            t.add_column(c)
        if clustered:
            t.add_column("clustered p")
        for c in res["comparisons"]:
            row = [c["a"], c["b"], _fmt(c["auc_diff"]), _ci(c["ci"]), _fmt(c["delong_z"], 2), _p(c["delong_p"])]
            if clustered:
                row.append(_p(c.get("clustered_p")))
            t.add_row(*row)
        con.print(t)
    if res.get("threshold") is not None:
        t = Table(title=f"At threshold {res['threshold']:g} (positive when score >= threshold; Wilson {lv}% CI)")
        t.add_column("score")
        for c in ("TP", "FP", "TN", "FN", "accuracy", "sensitivity", "specificity", "PPV", "NPV", "F1"):
            t.add_column(c)
        for s, e in res["scores"].items():
            tm = e["threshold_metrics"]
            cf = tm["confusion"]
            t.add_row(s, str(cf["tp"]), str(cf["fp"]), str(cf["tn"]), str(cf["fn"]),
                      *[f"{_fmt(tm[k]['value'])} {_ci(tm[k]['ci'], 2)}"
                        for k in ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1")])
        con.print(t)
    if res["readers"]:
        t = Table(title="Model versus reader (exact McNemar; precision: paired bootstrap)")
        for c in ("reader", "model", "reader sens", "reader spec", "p accuracy", "p sensitivity",
                  "p specificity", "p precision"):
            t.add_column(c)
        for r, e in res["readers"].items():
            for s, v in e["vs"].items():
                t.add_row(r, s, _fmt(e["sensitivity"]["value"]), _fmt(e["specificity"]["value"]),
                          _p(v["mcnemar_p"]), _p(v["mcnemar_p_sensitivity"]), _p(v["mcnemar_p_specificity"]),
                          _p(v["precision_p"]))
        con.print(t)
        for r, e in res["readers"].items():
            if e.get("scale") == "rating":
                con.print(f"Reader {r} (1-5 ratings; a call is rating >= {e['positive_rating']}): AUC "
                          f"{_fmt(e['auc'])} {_ci(e['auc_ci_delong'])} (DeLong)", markup=False)
        if res.get("reader_agreement"):
            for pr in res["reader_agreement"]["pairs"]:
                con.print(f"Cohen's kappa {pr['a']} vs {pr['b']}: {_fmt(pr['kappa'])} {_ci(pr['ci'])} (n = {pr['n']})")
