"""JupyterLab for real: run 02_where_to_spend.ipynb in headless chromium and drag the budget slider.

`make browser` runs it in quick mode (TINYLAB_QUICK=1, which the kernel inherits from the server).
It drives Debian's chromium (/usr/bin/chromium, `make browser-deps` installs it) with Python
playwright; it never downloads a browser (`playwright install` does not work on these machines).
JupyterLab serves a copy of the notebook from a temporary folder, with its own config, settings
and workspace folders, so the repository's notebook is never saved over and the user's JupyterLab
set-up plays no part. The screenshot lands in test-output/browser/ (gitignored).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "02_where_to_spend.ipynb"
OUTPUT = ROOT / "test-output" / "browser"
CHROMIUM = Path(os.environ.get("TINYLAB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SERVER_START_S = 60
NOTEBOOK_RUN_S = 600  # the whole notebook in quick mode, including the kernel's imports


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def jupyterlab(tmp_path, request):
    """A JupyterLab server on 127.0.0.1 with a token, serving a copy of the notebook (NOTEBOOK, or the
    one a test passes through `indirect` parametrization); yields its base URL."""
    source = getattr(request, "param", NOTEBOOK)
    work = tmp_path / "notebooks"
    work.mkdir()
    # a copy without outputs: every execution count on the page then comes from this run
    notebook = json.loads(source.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    (work / source.name).write_text(json.dumps(notebook))
    # No first-run news prompt; all cells stay in the DOM (no windowing), so outputs can be found.
    _write_json(tmp_path / "config" / "labconfig" / "page_config.json",
                '{"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": true}}')
    _write_json(tmp_path / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
                '{"windowingMode": "none"}')
    env = dict(os.environ, TINYLAB_QUICK="1", TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1", JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    port, token = _free_port(), secrets.token_hex(16)
    log = (tmp_path / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
         "--LabApp.extension_manager=readonly", "--ServerApp.port_retries=0"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _cell_prompts(page) -> list[str]:
    return page.eval_on_selector_all(".jp-CodeCell .jp-InputArea-prompt", "els => els.map(e => e.textContent)")


# The status bar reads "<kernel name> | Idle" once a kernel is up (the toolbar's indicator says idle before).
_KERNEL_IDLE = """() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]
    .some(e => /\\| Idle$/.test(e.textContent.trim()) && !e.textContent.startsWith('No Kernel'))"""


def _kernel_idle(page) -> bool:
    return page.evaluate(_KERNEL_IDLE)


def _run_all(page) -> None:
    """Run > Run All Cells once the kernel is up, then wait until every code cell has an execution count."""
    page.wait_for_function(_KERNEL_IDLE, timeout=SERVER_START_S * 1000)
    for _ in range(3):  # a click that lands while the page is still settling can be lost: check, retry
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        started = time.monotonic()
        while time.monotonic() - started < 20 and all(p.strip() == "[ ]:" for p in _cell_prompts(page)):
            page.wait_for_timeout(500)
        if not all(p.strip() == "[ ]:" for p in _cell_prompts(page)):
            break
    deadline = time.monotonic() + NOTEBOOK_RUN_S
    while time.monotonic() < deadline:
        prompts = _cell_prompts(page)
        if prompts and all(re.fullmatch(r"\[\d+\]:", p.strip()) for p in prompts):
            return
        # the kernel is idle but cells are left unrun: an earlier cell raised, and Run All stopped there
        if _kernel_idle(page) and "[*]:" not in prompts and any(re.fullmatch(r"\[\d+\]:", p.strip()) for p in prompts):
            page.wait_for_timeout(5000)
            if _cell_prompts(page) == prompts:
                errors = page.eval_on_selector_all(
                    ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                    "els => els.map(e => e.textContent)")
                pytest.fail(f"the notebook stopped with cells unrun ({prompts}); stderr:\n" + "\n".join(errors)[-4000:])
        page.wait_for_timeout(1000)
    pytest.fail(f"the notebook did not finish within {NOTEBOOK_RUN_S} s; cell prompts: {_cell_prompts(page)}")


@contextlib.contextmanager
def _lab_page(jupyterlab, name: str, failure_png: str):
    """Headless chromium with notebook `name` open in the JupyterLab of `jupyterlab` and all its cells
    run (a screenshot on failure); closed after the block."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: `make browser-deps` installs Debian's chromium"
    base, token = jupyterlab
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{base}/lab/tree/{name}?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=SERVER_START_S * 1000)
            try:
                _run_all(page)
            except BaseException:
                page.screenshot(path=str(OUTPUT / failure_png))
                raise
            yield page
        finally:
            browser.close()


def _drag(page, slider, fraction: float) -> None:
    """Drag an ipywidgets slider's handle to `fraction` of its track; the value is sent on release."""
    handle = slider.locator(".noUi-handle").first
    handle.scroll_into_view_if_needed()
    track = slider.locator(".noUi-base").first.bounding_box()
    grip = handle.bounding_box()
    page.mouse.move(grip["x"] + grip["width"] / 2, grip["y"] + grip["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + fraction * track["width"], track["y"] + track["height"] / 2, steps=10)
    page.mouse.up()


def test_budget_slider_moves_readout_and_heatmap_draws(jupyterlab):
    with _lab_page(jupyterlab, NOTEBOOK.name, "02_failure.png") as page:
        # the budget slider's output: slider, readout, and its heatmap (a plotly FigureWidget via anywidget)
        widget = page.locator(".jp-OutputArea-output:has(.widget-hslider:has(label:text-is('params')))").first
        widget.wait_for(timeout=30_000)
        slider = widget.locator(".widget-hslider:has(label:text-is('params'))").first
        readout = widget.locator(".widget-html-content", has_text=re.compile(r"params \((exact|nearest)")).first
        heatmap = widget.locator(".js-plotly-plot:has(.hm image)").first
        heatmap.wait_for(timeout=30_000)  # drawn: an svg with a heatmap trace
        assert widget.locator(".js-plotly-plot .shapelayer path").count() > 0  # the planned modules' outlines
        before = readout.inner_text()
        shown_before = slider.locator(".widget-readout").inner_text()

        _drag(page, slider, 0.75)  # three quarters of the track (the value is sent on release)
        page.wait_for_function(
            "([el, old]) => el.innerText !== old", arg=[readout.element_handle(), before], timeout=30_000)
        after = readout.inner_text()
        shown_after = slider.locator(".widget-readout").inner_text()

        count = lambda text: int(re.search(r"([\d,]+)\s+params", text).group(1).replace(",", ""))  # noqa: E731
        assert shown_after != shown_before, (shown_before, shown_after)
        assert count(after) > count(before), (before, after)
        assert heatmap.locator(".hm image").count() == 1  # still drawn after the re-plan

        widget.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        widget.screenshot(path=str(OUTPUT / "02_budget_slider.png"))
        page.screenshot(path=str(OUTPUT / "02_where_to_spend.png"))


KNOBS_NOTEBOOK = ROOT / "notebooks" / "07_thirteen_knobs.ipynb"


@pytest.mark.parametrize("jupyterlab", [KNOBS_NOTEBOOK], indirect=True)
def test_dragging_a_knob_changes_the_panels_score(jupyterlab):
    """Notebook 07's KnobPanel: drag the v0 slider near the end of its track; the panel's "now" gold
    log-prob is recomputed by the kernel and redrawn."""
    with _lab_page(jupyterlab, KNOBS_NOTEBOOK.name, "07_failure.png") as page:
        knob = ".widget-hslider:has(label:text-is('v0'))"
        panel = page.locator(f".jp-OutputArea-output:has({knob})").first
        panel.wait_for(timeout=30_000)
        summary = panel.locator(".widget-html-content", has_text="mean gold log-prob: base").first
        now = lambda: float(re.search(r"now (-?[\d.]+)", summary.inner_text()).group(1))  # noqa: E731
        score_before = now()
        shown_before = panel.locator(knob).locator(".widget-readout").inner_text()

        _drag(page, panel.locator(knob).first, 0.95)
        page.wait_for_function("([el, old]) => !el.innerText.includes('now ' + old)",
                               arg=[summary.element_handle(), f"{score_before:.4f}"], timeout=120_000)
        assert panel.locator(knob).locator(".widget-readout").inner_text() != shown_before
        assert now() != score_before, summary.inner_text()

        panel.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        panel.screenshot(path=str(OUTPUT / "07_knob_panel.png"))
