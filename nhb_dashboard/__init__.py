"""The Streamlit dashboard's Python side (``streamlit run app.py``; see docs/dashboard.md).

- :mod:`nhb_dashboard.nav`: the pages, declared once (``app.py`` builds ``st.navigation`` from it).
- :mod:`nhb_dashboard.ui`: Streamlit helpers shared by the pages (page setup, error guard, cached
  loaders, the manifest picker, progress).
- :mod:`nhb_dashboard.data`: the pages' data layer in plain Python (runs table, progress rows, outcome
  tables, the Launch form's config, uploads); no Streamlit, unit-testable.
- :mod:`nhb_dashboard.figs`: page-specific layout of the shared ``nhb_core.figures``.

``nhb_core`` never imports this package.
"""
