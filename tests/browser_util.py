"""What the real-browser tests share: Debian's chromium driven by Playwright, and a
``streamlit run app.py`` server on a free loopback port (both from :mod:`nhb_dashboard.serve`,
which the benchmarks and docs/tools use too); here the browser skips the test where it is missing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from nhb_dashboard.serve import CHROMIUM, BrowserUnavailable, DashboardServer, free_port
from nhb_dashboard.serve import chromium as _chromium
from nhb_dashboard.serve import dashboard_server as streamlit_server

__all__ = ["CHROMIUM", "DashboardServer", "chromium", "free_port", "streamlit_server"]


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (Playwright ``Browser``); skips the test where chromium or Playwright is missing."""
    try:
        cm = _chromium()
        browser = cm.__enter__()
    except BrowserUnavailable as e:
        pytest.skip(str(e))
    try:
        yield browser
    finally:
        cm.__exit__(None, None, None)
