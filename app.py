"""NHB Lab dashboard: ``streamlit run app.py``.

The entry point only declares the navigation: the pages are listed once, in
:data:`nhb_dashboard.nav.PAGES` (Home is ``dashboard_pages/0_Home.py``). Runs folder:
``$NHB_RUNS_DIR`` (default ``./runs``). Everything is a thin layer over ``nhb_core``;
see docs/dashboard.md.
"""

from __future__ import annotations

import streamlit as st

from nhb_dashboard import nav

st.set_page_config(page_title=nav.APP_TITLE, page_icon=nav.APP_ICON, layout="wide")
st.navigation(nav.st_pages()).run()
