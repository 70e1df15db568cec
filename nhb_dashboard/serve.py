"""Serve the dashboard on a loopback port and open it in headless Chromium, from Python.

What the real-browser tests, ``benchmarks/bench_pages.py --browser`` and
``docs/tools/make_screenshots.py`` share: ``streamlit run app.py`` in its own process group on a free
port (:class:`DashboardServer`, restartable on the same port; :func:`dashboard_server` as a context
manager), and Debian's Chromium driven by Playwright through its executable path
(:func:`chromium`). Nothing here imports Streamlit or is imported by the app.

>>> with dashboard_server({"NHB_RUNS_DIR": "runs"}, Path("/tmp/streamlit.log")) as url:  # doctest: +SKIP
...     with chromium() as browser:
...         browser.new_page().goto(url + "/?run=demo")
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Debian's chromium (``$CHROMIUM`` overrides it)
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


#: JavaScript expression: every Plotly chart element of the page holds a drawn plot (Plotly draws after
#: the page's script has ended)
PLOTS_DRAWN = ("document.querySelectorAll('.js-plotly-plot').length >= "
               "document.querySelectorAll('[data-testid=\"stPlotlyChart\"]').length")


def wait_until_drawn(page, timeout_ms: int = 240_000) -> None:
    """Wait (Playwright ``page``) until the page has a title, its script has stopped and every chart is drawn."""
    page.wait_for_selector("h1", timeout=timeout_ms)
    page.wait_for_selector('[data-test-script-state="notRunning"]', timeout=timeout_ms)
    page.wait_for_function(f"() => {PLOTS_DRAWN}", timeout=timeout_ms)


class BrowserUnavailable(RuntimeError):
    """Chromium or Playwright for Python is not installed (tests skip on it)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class DashboardServer:
    """``streamlit run app.py`` on a fixed free loopback port, in its own process group.

    Parameters
    ----------
    env : mapping
        Added to this process's environment (e.g. ``NHB_RUNS_DIR``, ``NHB_DATA_DIR``).
    log_path : path
        The server's stdout and stderr (appended; the last 2000 characters go into a start error).
    timeout_s : float
        Seconds :meth:`start` waits for ``/_stcore/health``.

    :meth:`start` returns once the server answers; :meth:`stop` ends the whole group (SIGTERM, then
    SIGKILL after 10 s); start after stop is a server restart on the same port and URL.
    """

    def __init__(self, env: Mapping[str, str], log_path: str | os.PathLike, timeout_s: float = 120.0):
        self.env = {**os.environ, **env}
        self.log_path = Path(log_path)
        self.timeout_s = float(timeout_s)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        with open(self.log_path, "a") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.port", str(self.port),
                 "--server.headless", "true", "--server.address", "127.0.0.1"],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(self.url + "/_stcore/health", timeout=2)
                return self.url
            except OSError:
                if self.proc.poll() is not None:
                    self.proc = None
                    raise RuntimeError("streamlit exited: " + self.log_path.read_text()[-2000:]) from None
                if time.monotonic() - t0 > self.timeout_s:
                    self.stop()
                    raise RuntimeError(f"streamlit did not come up in {self.timeout_s:.0f} s "
                                       f"(log: {self.log_path})") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@contextlib.contextmanager
def dashboard_server(env: Mapping[str, str], log_path: str | os.PathLike, timeout_s: float = 120.0) -> Iterator[str]:
    """:class:`DashboardServer` as a context manager: yields its URL once it answers, stops it afterwards."""
    srv = DashboardServer(env, log_path, timeout_s)
    try:
        yield srv.start()
    finally:
        srv.stop()


@contextlib.contextmanager
def chromium(executable: str | None = None) -> Iterator[object]:
    """A headless Chromium (Playwright ``Browser``) through its executable path.

    Raises :class:`BrowserUnavailable` where the executable or ``playwright`` is missing.
    """
    exe = executable or CHROMIUM
    if not Path(exe).exists():
        raise BrowserUnavailable(f"{exe} is missing (make test installs Debian's chromium where apt is available)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise BrowserUnavailable("playwright is not installed (pip install -e .[dev])") from e
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()
