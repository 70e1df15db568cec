"""What the real-browser tests share: Debian's chromium driven by Playwright, and a
``streamlit run app.py`` server on a free loopback port (both from :mod:`nhb_dashboard.serve`,
which the benchmarks and docs/tools use too); here the browser skips the test where it is missing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from nhb_dashboard.serve import BrowserUnavailable, DashboardServer, wait_until_drawn
from nhb_dashboard.serve import chromium as _chromium
from nhb_dashboard.serve import dashboard_server as streamlit_server

__all__ = ["DashboardServer", "chromium", "streamlit_server", "wait_until_drawn"]


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (Playwright ``Browser``); skips the test where chromium or Playwright is missing."""
    try:
        with _chromium() as browser:
            yield browser
    except BrowserUnavailable as e:  # raised before the browser starts, never by the test body
        pytest.skip(str(e))
