"""Page layout of the figures of :mod:`nhb_core.figures` (shared with the HTML report).

The figures are built by ``nhb_core.figures``; the Results page gives each a section heading of
its own and sits them in narrower columns than the report, so it adjusts titles, margins and
legends here (plain plotly, no Streamlit). Each function changes the figure in place and returns it.
"""

from __future__ import annotations

from typing import Any

# a legend under the plot area, left-aligned, one entry per line when long
_LEGEND_BELOW = dict(orientation="h", x=0, xanchor="left", y=-0.22, yanchor="top", font=dict(size=10),
                     bgcolor="rgba(0,0,0,0)")


def roc(fig: Any) -> Any:
    """ROC panel: legend under the square plot so narrow panels keep a readable 0-1 axis."""
    fig.update_layout(height=640, legend=dict(orientation="v", x=0, y=-0.16, xanchor="left", yanchor="top",
                                              bgcolor="rgba(0,0,0,0)"), margin=dict(l=50, r=10, t=50, b=10))
    return fig


def confusion(fig: Any) -> Any:
    """Confusion matrices: no figure title (the page's heading says it; the title used to sit on
    top of the two-line model names), room above the panels for those names."""
    n_titles = len(fig.layout.annotations or ())
    fig.update_layout(title=None, margin=dict(t=70 if n_titles else 30, b=40), height=320)
    return fig


def below_legend(fig: Any, height: int = 460) -> Any:
    """Calibration / decision curves: the legend under the plot instead of at its right (long
    labels such as ``resnet18 (int 0.12, slope 0.95, Brier 0.210)`` squeezed the plot in a
    half-width column). The figure title stays (it names the set and level)."""
    fig.update_layout(height=height, legend=_LEGEND_BELOW, margin=dict(l=60, r=20, t=50, b=150))
    return fig


def training(fig: Any) -> Any:
    """Training curves: no figure title (the section heading is "Training curves")."""
    fig.update_layout(title=None, margin=dict(t=40))
    return fig
