"""``python -m nhb_core mrmc``: multi-reader multi-case ROC analysis (Obuchowski-Rockette, Hillis df)
of a long-format readings CSV (``reader, modality, case_id, truth, rating``; docs/stats.md "MRMC")."""

from __future__ import annotations

from pathlib import Path

import typer

from nhb_core.cli import app


def _f(x, nd=4) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    xf = float(x)
    if xf != xf:
        return "-"
    if xf in (float("inf"), float("-inf")):
        return "inf" if xf > 0 else "-inf"
    return f"{xf:.{nd}f}"


def _p(p) -> str:
    if p is None or p != p:
        return "-"
    return "<0.0001" if p < 0.0001 else f"{p:.4f}"


@app.command("mrmc")
def mrmc_command(
    readings: Path = typer.Option(..., "--readings", help="Long-format readings CSV: reader, modality, case_id, "
                                  "truth, rating (one row per reader x modality x case)."),
    cov: str = typer.Option("jackknife", "--cov", help="Covariance of the AUCs: jackknife or delong."),
    level: float = typer.Option(0.95, "--level", help="Confidence level."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout (docs/stats.md)."),
) -> None:
    """Multi-reader multi-case ROC analysis: empirical AUC per reader and modality, Obuchowski-Rockette
    with Hillis degrees of freedom for random readers and cases (RRRC), fixed readers (FRRC) and fixed
    cases (RRFC); reader-averaged AUC per modality, differences with CIs, F, df, p."""
    from nhb_core.errors import StatsInputError
    from nhb_core.fileio import to_json
    from nhb_core.stats import mrmc as M

    if cov.strip().lower() not in M.COV_METHODS:
        raise StatsInputError("--cov", f"unknown covariance method '{cov}'", "Use jackknife or delong")
    if not 0 < level < 1:
        raise StatsInputError("--level", f"confidence level {level} is not between 0 and 1", "Use e.g. 0.95")
    res = M.mrmc(readings, cov=cov, level=level)
    if as_json:
        typer.echo(to_json(M.json_ready(res), indent=None))
        return
    _print(res)


def _print(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    lv = int(round(res["level"] * 100))
    mods, rdrs = res["modalities"], res["readers"]
    con.print(f"[bold]{res['source']}[/]: {len(rdrs)} readers x {len(mods)} modalities x {res['n_cases']} cases "
              f"({res['n_pos']} positive, {res['n_neg']} negative); covariance: {res['cov_method']}")
    t = Table(title="Empirical AUC per reader (SE)")
    t.add_column("reader")
    for m in mods:
        t.add_column(f"modality {m}")
    for r in rdrs:
        t.add_row(r, *[f"{_f(res['reader_auc'][f'{m}|{r}'])} ({_f(res['reader_auc_se'][f'{m}|{r}'])})" for m in mods])
    con.print(t)
    t = Table(title=f"Reader-averaged AUC per modality ({lv}% CI)")
    for c in ("modality", "AUC", "RRRC CI (df)", "FRRC CI", "RRFC CI"):
        t.add_column(c)
    for m in mods:
        a, b, c = (res[k]["single_modality"][m] for k in ("RRRC", "FRRC", "RRFC"))
        t.add_row(m, _f(a["estimate"]), f"[{_f(a['ci_lower'])}, {_f(a['ci_upper'])}] ({_f(a['df'], 1)})",
                  f"[{_f(b['ci_lower'])}, {_f(b['ci_upper'])}]", f"[{_f(c['ci_lower'])}, {_f(c['ci_upper'])}]")
    con.print(t)
    t = Table(title=f"Modality comparisons ({lv}% CI)")
    for c in ("analysis", "global test", "comparison", "difference", "SE", "CI", "p"):
        t.add_column(c)
    for an in ("RRRC", "FRRC", "RRFC"):
        blk = res[an]
        if an == "FRRC":
            glob = f"X2({blk['df']}) = {_f(blk['X2'], 3)}, p = {_p(blk['p'])}"
        else:
            glob = f"F({blk['df1']}, {_f(blk['df2'], 2)}) = {_f(blk['F'], 3)}, p = {_p(blk['p'])}"
        for k, d in enumerate(blk["diffs"]):
            t.add_row(an if k == 0 else "", glob if k == 0 else "", d["comparison"], _f(d["estimate"]),
                      _f(d["stderr"]), f"[{_f(d['ci_lower'])}, {_f(d['ci_upper'])}]", _p(d["p"]))
    con.print(t)
    vc = res["variance_components"]
    con.print("Variance components: " + ", ".join(f"{k} = {vc[k]:.6g}" for k in vc)
              + "; correlations: " + ", ".join(f"{k} = {_f(v, 3)}" for k, v in res["correlations"].items()))
    con.print("RRRC: random readers and cases (Hillis df); FRRC: these readers only; RRFC: these cases only.")
