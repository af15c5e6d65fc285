"""Notebook 03 in a real browser: JupyterLab on loopback, headless Debian Chromium driven by Playwright.

A papermill-parameterised (not executed) copy of the notebook with the tiny preset is opened in JupyterLab, run
with Run > Run All Cells on the `rnnt-workbench` kernel; the test checks that the widget controls render (the
freeze-length and learning-rate sliders), that the parameter run's live plot renders as a PNG image, and that the
widgets' Run button forks a second run whose figure appears in the widget. A screenshot is written under the
pytest tmp dir and copied to runs/browser/notebook03.png for a person to look at.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import pytest

from browser_lab import CHROMIUM, CHROMIUM_FLAGS, LabServer, parameterized_copy, start_lab

if TYPE_CHECKING:
    from playwright.sync_api import Page

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "03_interactive_explorer.ipynb"
SHOTS = ROOT / "runs" / "browser"  # git-ignored
KERNEL = "rnnt-workbench"
# Tiny preset and short runs: the whole notebook executes in seconds on a 2-core CPU.
PARAMETERS = dict(preset="tiny", seed=0, steps=6, freeze_steps=0, lr=1e-5, policy="none", precision="fp16",
                  semantics="seed_faithful")
PNG = 'img[src^="data:image/png"]'
T = TypeVar("T")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (Debian: apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="the playwright Python package is missing (pip install playwright)"),
    pytest.mark.timeout(300),
]


@pytest.fixture()
def notebook_copy() -> Iterator[Path]:
    """A parameterised copy of notebook 03 in a temp folder under runs/browser (inside the server root)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="nb03-", dir=SHOTS))
    try:
        yield folder / NOTEBOOK.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def lab(tmp_path: Path) -> Iterator[LabServer]:
    server = start_lab(ROOT, tmp_path / "jupyter")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def page(tmp_path: Path) -> Iterator[Page]:
    """A page in headless Debian Chromium with a fresh profile, closed (with the driver) even on failure."""
    from playwright.sync_api import sync_playwright

    driver = sync_playwright().start()
    try:
        context = driver.chromium.launch_persistent_context(
            tmp_path / "chromium-profile", executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_FLAGS),
            viewport={"width": 1400, "height": 1300})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
    finally:
        driver.stop()


def wait_for(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll `condition` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def notebook_session(lab: LabServer, relative: str) -> dict[str, Any] | None:
    """The server's session for the notebook at `relative`, or None."""
    return next((s for s in lab.api("/api/sessions") if s.get("path") == relative), None)


def output_text(page: Page) -> str:
    return "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())


@pytest.mark.slow
def test_notebook03_runs_in_jupyterlab_with_widgets_and_plots(notebook_copy: Path, lab: LabServer, page: Page,
                                                                tmp_path: Path, ctc_cache: Path,
                                                                ctc_warmup: dict) -> None:
    # Fixture order matters for teardown (reverse order): browser, then server, then the notebook's folder.
    out = tmp_path / "nb03-out"
    parameters = dict(PARAMETERS, output_dir=str(out), cache_dir=str(ctc_cache), ctc_steps=ctc_warmup["steps"],
                      ctc_lr=ctc_warmup["lr"])
    parameterized_copy(NOTEBOOK, notebook_copy, parameters)
    relative = notebook_copy.relative_to(ROOT).as_posix()
    shot = tmp_path / "notebook03.png"
    try:
        page.goto(lab.page_url(relative))
        page.locator(".jp-Notebook").first.wait_for(state="visible", timeout=60_000)

        # The notebook's kernelspec names rnnt-workbench; JupyterLab must start exactly that kernel, unprompted.
        session = wait_for(lambda: notebook_session(lab, relative), 60, "the notebook's kernel session")
        assert session["kernel"]["name"] == KERNEL
        wait_for(lambda: (notebook_session(lab, relative) or {}).get("kernel", {}).get("execution_state") == "idle",
                 60, f"kernel {KERNEL} to be idle")
        page.keyboard.press("Control+b")  # hide the file browser: more room for the notebook in the screenshot

        # Run > Run All Cells, through the menu as a person would.
        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-item:visible", has_text=re.compile(r"^Run All Cells")).first.click()

        # Every code cell ran ([*] gone, the last one numbered) or one failed (Run All stops there).
        def finished() -> bool:
            prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
            if not prompts or any("*" in prompt for prompt in prompts):
                return False
            return bool(re.search(r"\d", prompts[-1])) or "Traceback" in output_text(page)

        wait_for(finished, 90, "Run All Cells to finish")
        text = output_text(page)
        assert "Traceback" not in text, text[-3000:]

        # Controls: the sliders for the freeze length N and the log-scale learning rate, rendered by the widget manager.
        controls = page.locator(".jupyter-widgets.widget-vbox").last
        for label in ("freeze length N", "learning rate"):
            slider = page.locator(".widget-slider", has=page.locator(".widget-label", has_text=label))
            slider.first.wait_for(state="visible", timeout=30_000)
        assert page.locator(".widget-slider .slider, .widget-slider .noUi-target").count() >= 3
        run_button = controls.locator("button", has_text=re.compile(r"^\s*Run\s*$"))
        run_button.wait_for(state="visible")

        # The parameter run's live figure: a PNG the browser actually decoded.
        plot = page.locator(f".jp-OutputArea-output {PNG}").first
        plot.wait_for(state="visible", timeout=30_000)
        assert plot.evaluate("img => img.complete && img.naturalWidth > 0"), "the figure's PNG did not decode"
        assert (out / "03_summary.json").exists() and (out / "03_explorer.png").exists()

        # The widgets' Run button forks a second run; its figure arrives in the widget's plot output.
        run_button.click()
        controls.locator(f".widget-output {PNG}").first.wait_for(state="visible", timeout=60_000)
        outcome = re.compile(r"#2 [^\n]*: (healthy|stalled|diverged); final loss")
        wait_for(lambda: outcome.search(controls.inner_text()) and not run_button.is_disabled(), 60,
                 "the widget run's outcome line")
        assert "Traceback" not in controls.inner_text(), controls.inner_text()[-3000:]

        controls.scroll_into_view_if_needed()
        page.screenshot(path=str(shot))
    except Exception as error:
        # Leave what the browser showed and the server log beside the error, for a person to look at.
        failure = tmp_path / "notebook03-failure.png"
        try:
            page.screenshot(path=str(failure))
            shutil.copyfile(failure, SHOTS / failure.name)
        except Exception:
            pass
        raise AssertionError(f"{error}\nscreenshot: {failure}\nJupyterLab log tail:\n{lab.log_tail()}") from error
    assert shot.stat().st_size > 10_000
    shutil.copyfile(shot, SHOTS / shot.name)
