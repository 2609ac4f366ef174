"""The MLflow UI in a real browser: a tiny grid's runs, their loss charts, datasets, models and system metrics,
and the grid's report, as a user sees them.

Headless Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
messages ending in NUL on file descriptors 3 and 4), so no driver or websocket package is needed.
Screenshots are kept in the test's temporary folder and copied to outputs/browser/.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import ROOT, TINY_GRID, VERDICT, MlflowServer
from mlflow.tracking import MlflowClient

import ablate

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (CI installs it with .ci/install-browser.sh)"
)
SHOTS = ROOT / "outputs" / "browser"
GRID = [
    *TINY_GRID,
    "--vary", "model.n_layers=1,2",
    "--seeds", "0",
    "--set", "train.epochs=2",
    "--set", "train.batch_size=16",
    "--name", "ui-grid",
    "--register-model", "ui-grid-best",
]  # fmt: skip
# The chart card titled `name` (the nearest ancestor of the title that holds a plot) and its drawn lines.
# The UI draws only the charts in view: a card without lines is scrolled into view for the next look.
CHART_LINES = """(name => {
  const title = [...document.querySelectorAll('h1,h2,h3,h4,h5,span,div')]
    .find(e => e.childElementCount === 0 && e.textContent.trim() === name);
  if (!title) {  // charts are put on the page as they come into view: show the next ones
    const drawn = [...document.querySelectorAll('.js-plotly-plot')];
    if (drawn.length) drawn[drawn.length - 1].scrollIntoView({block: 'start'});
    return 0;
  }
  title.scrollIntoView({block: 'center'});
  let card = title;
  while (card && !card.querySelector('.js-plotly-plot')) card = card.parentElement;
  const lines = card ? [...card.querySelectorAll('.js-plotly-plot path.js-line')]
    .filter(p => (p.getAttribute('d') || '').includes('L')).length : 0;
  if (title && !lines) title.scrollIntoView({block: 'center'});
  return lines;
})"""


class Browser:
    """A headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1300):
        to_browser, self._to_browser = (_above_stdio(fd) for fd in os.pipe())
        self._from_browser, from_browser = (_above_stdio(fd) for fd in os.pipe())
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                 f"--window-size={width},{height}", "about:blank"]  # fmt: skip
        # the protocol pipe must be fds 3 (commands in) and 4 (replies out): bash puts them there
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}', CHROMIUM, *flags],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._next_id, self.session = b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        """Send one command (to the page once attached) and return its result; events are skipped."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"chromium did not answer {method} within {timeout} s")
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self.process.poll()}) during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_until(self, expression: str, what: str, folder: Path, timeout: float = 90) -> None:
        """Poll a JavaScript condition; on timeout keep a screenshot and fail with what the page shows."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return
            time.sleep(0.5)
        shot = self.screenshot(folder / f"timeout-{what.replace(' ', '_')}.png")
        pytest.fail(
            f"the page never showed {what} within {timeout} s (screenshot {shot}); its text:\n{self.text()[:3000]}"
        )

    def close_assistant(self) -> None:
        """The MLflow Assistant side panel takes a third of the page; screenshots are clearer without it."""
        self.evaluate("document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, SHOTS / path.name)
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)


def _above_stdio(fd: int) -> int:
    """A copy of fd numbered 10 or more, so that moving the pipe to fds 3 and 4 cannot overwrite it."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


def assert_model_training_view(text: str) -> None:
    """MLflow 3 has two sets of pages; ?workflowType=machine_learning must open the model-training one."""
    navigation = text.split("Docs")[0]  # the side bar, above its Docs link
    assert "Model registry" in navigation and "Judges" not in navigation, f"not the model-training view:\n{navigation}"


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str, dict[str, str]]]:
    """A server holding a tiny 2-cell grid: (url, experiment id, parent run id, child run name -> id)."""
    folder = tmp_path_factory.mktemp("ui-server")
    text = folder / "verdict_head.txt"
    text.write_text(VERDICT.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    server = MlflowServer(folder)
    server.start()
    # MLflow's setting: several readings even in a cell that trains for under a second (one reading is a bar)
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.05"
    try:
        args = ["run", *GRID, "--data", str(text), "--tracking-uri", server.url, "--out-dir", str(folder / "report")]
        result = CliRunner().invoke(ablate.main, args)
        assert result.exit_code == 0, result.output
        assert "registered models:/ui-grid-best/1: cell " in result.output
        parent_id = result.output.strip().splitlines()[-1].split(": ", 1)[1]
        client = MlflowClient(server.url)
        experiment_id = client.get_run(parent_id).info.experiment_id
        runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
        yield server.url, experiment_id, parent_id, {r.info.run_name: r.info.run_id for r in runs}
    finally:
        os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", None)
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    browser = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def test_runs_list_shows_the_grids_training_runs_by_name(grid, browser: Browser, shots: Path) -> None:
    url, experiment_id, _, children = grid
    assert len(children) == 2
    browser.open(f"{url}/#/experiments/{experiment_id}?workflowType=machine_learning")
    expander = "document.querySelector('button[data-component-id*=\"runnamecellrenderer\"]')"
    browser.wait_until(f"document.body.innerText.includes('ui-grid') && !!{expander}", "the parent run", shots)
    browser.close_assistant()
    browser.evaluate(f"{expander}.click()")  # the child runs are folded under their parent
    names = " && ".join(f"document.body.innerText.includes({json.dumps(name)})" for name in children)
    browser.wait_until(names, "the child run names", shots)
    browser.screenshot(shots / "runs.png")
    assert_model_training_view(browser.text())


def test_run_page_draws_the_train_and_val_loss_charts(grid, browser: Browser, shots: Path) -> None:
    url, experiment_id, _, children = grid
    run_id = children[min(children)]
    browser.open(f"{url}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?workflowType=machine_learning")
    for metric in ("train_loss", "val_loss"):
        browser.wait_until(f"{CHART_LINES}('{metric}') > 0", f"the {metric} chart", shots)
    browser.close_assistant()
    time.sleep(1)  # the charts re-lay out to the freed width
    browser.screenshot(shots / "model-metrics.png")
    assert min(children) in browser.text()
    assert_model_training_view(browser.text())


def test_run_page_lists_the_dataset_the_logged_model_and_its_registered_version(grid, browser, shots: Path) -> None:
    url, experiment_id, _, children = grid
    run_id = MlflowClient(url).get_model_version("ui-grid-best", "1").run_id  # the grid's best cell
    assert run_id in children.values()
    browser.open(f"{url}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning")
    shown = ["Datasets", "verdict_head (", "Training", "Logged models (1)", "Registered models", "ui-grid-best"]
    condition = " && ".join(f"document.body.innerText.includes({json.dumps(text)})" for text in shown)
    browser.wait_until(condition, "the datasets, logged model and registered version", shots)
    browser.close_assistant()
    browser.screenshot(shots / "run-overview.png")
    browser.evaluate(  # the Logged models table sits below the parameters
        "[...document.querySelectorAll('h1,h2,h3,h4,h5,span,div')].find(e => e.childElementCount === 0 && "
        "e.textContent.trim().startsWith('Logged models')).scrollIntoView()"
    )
    time.sleep(1)
    browser.screenshot(shots / "run-logged-model.png")
    text = browser.text()
    assert "Description" in text and "best val loss" in text  # the run's one-line summary
    assert "Registered models: None" not in text and "Datasets: None" not in text


def test_system_metrics_tab_charts_cpu_and_memory(grid, browser: Browser, shots: Path) -> None:
    url, experiment_id, _, children = grid
    run_id = children[min(children)]
    browser.open(f"{url}/#/experiments/{experiment_id}/runs/{run_id}/system-metrics?workflowType=machine_learning")
    charts = ("cpu_utilization_percentage", "system_memory_usage_megabytes")
    for chart in charts:  # the UI draws a metric of one reading as a bar, of several as a line
        readings = MlflowClient(url).get_metric_history(run_id, f"system/{chart}")
        assert len(readings) >= 2, f"system/{chart} has {len(readings)} reading(s): no line to draw"
    for chart in charts:  # one at a time: the page draws only the charts in view, so two far apart never show at once
        browser.wait_until(f"{CHART_LINES}('{chart}') > 0", f"the {chart} chart", shots)
    browser.close_assistant()
    time.sleep(1)
    browser.screenshot(shots / "system-metrics.png")
    assert "System metrics" in browser.text()


def test_the_grids_report_opens_from_the_parent_runs_artifacts(grid, browser: Browser, shots: Path) -> None:
    url, experiment_id, parent_id, _ = grid
    browser.open(
        f"{url}/#/experiments/{experiment_id}/runs/{parent_id}/artifacts/report.md?workflowType=machine_learning"
    )
    rendered = "!!document.querySelector('h1') && document.body.innerText.includes('Ablation: ui-grid: n_layers')"
    browser.wait_until(f"{rendered} && document.body.innerText.includes('Against the base level')",
                       "the rendered report.md", shots)  # fmt: skip
    browser.close_assistant()
    browser.screenshot(shots / "report.png")
    assert "grid.yaml" in browser.text() and "summary.csv" in browser.text(), "the parent's other artifacts are listed"
    assert_model_training_view(browser.text())


# The HTML artifact MLflow shows in a sandboxed iframe (a blob: URL of the page's own making, so it can fetch it):
# its text and how many images it holds inline.
IFRAME = """(async () => {
  for (const frame of document.querySelectorAll('iframe')) {
    if (!(frame.src || '').startsWith('blob:')) continue;
    const html = await (await fetch(frame.src)).text();
    const images = (html.match(/src="data:image[/]png;base64,/g) || []).length;
    if (html.includes('Verdict')) return {text: html, images: images};
  }
  return null;
})()"""


def test_report_html_shows_the_verdict_and_the_plots_inline(grid, browser: Browser, shots: Path) -> None:
    url, experiment_id, parent_id, _ = grid
    browser.open("about:blank")  # from report.md's page, the app would not switch artifacts on a new hash alone
    browser.open(
        f"{url}/#/experiments/{experiment_id}/runs/{parent_id}/artifacts/report.html?workflowType=machine_learning"
    )
    browser.wait_until(f"{IFRAME}.then(found => !!found)", "report.html in the artifact viewer", shots)
    browser.close_assistant()
    time.sleep(1)
    browser.screenshot(shots / "report-html.png")
    page = browser.evaluate(IFRAME)
    assert "n_layers 1 vs 2" in page["text"] and page["images"] == 2, "the verdict and both plots, inline"


def test_the_printed_grid_link_lists_every_child_run(grid, browser: Browser, shots: Path) -> None:
    from gpt.ablation.report import grid_link

    url, experiment_id, parent_id, children = grid
    browser.open("about:blank")
    browser.open(grid_link(url, experiment_id, parent_id))
    names = " && ".join(f"document.body.innerText.includes({json.dumps(name[:12])})" for name in children)
    search = f"[...document.querySelectorAll('input')].some(i => i.value.includes('{parent_id}'))"
    browser.wait_until(f"{names} && {search}", "the child runs, filtered by their parent", shots)
    browser.wait_until("document.body.innerText.includes('2 matching runs')", "only the grid's children", shots)
    browser.close_assistant()
    browser.screenshot(shots / "grid-link.png")
    assert all(name.startswith("n_layers=") for name in children), "names lead with the factor"
