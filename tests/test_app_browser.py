"""app.py in a real browser: `streamlit run app.py` on a free localhost port, opened in headless
Chromium driven by Playwright, waits for a plotly chart to render and saves a screenshot.

Skipped only where Chromium (Debian's package, /usr/bin/chromium) or the playwright package is
missing; `.ci/run` installs both. Set GFLOWGR_SCREENSHOTS=<folder> to keep the screenshot.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(app_runs):
    port = free_port()
    env = {**os.environ, "GFLOWGR_RUNS": str(app_runs), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("streamlit did not open its port within 60 s")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_app_renders_charts_in_chromium(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        # a persistent context is Playwright's way to give Chromium a new, empty --user-data-dir
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, args=FLAGS,
                                                       headless=True, viewport={"width": 1400, "height": 1800})
        page = browser.new_page()
        page.goto(server)
        page.wait_for_selector('[data-testid="stPlotlyChart"] .main-svg', timeout=120_000)
        assert page.title() == "GFlowGR inspector"
        assert page.locator("h1").first.inner_text().strip() == "GFlowGR inspector"
        assert page.locator('[data-testid="stPlotlyChart"] .main-svg').count() >= 1
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("GFLOWGR_SCREENSHOTS"):
        Path(os.environ["GFLOWGR_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["GFLOWGR_SCREENSHOTS"]) / "app.png")
