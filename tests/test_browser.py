"""The docs site and JupyterLab, in a real headless browser (Debian's chromium, driven by Playwright).

Screenshots are kept in $FINETUNE_LAB_SCREENSHOTS (default runs/screenshots). Without /usr/bin/chromium these
tests skip, unless FINETUNE_LAB_REQUIRE_BROWSER=1 (set by .ci/run, which installs chromium), where they fail."""
import functools, http.server, os, secrets, shutil, socket, subprocess, sys, threading, time, urllib.error, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("FINETUNE_LAB_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("FINETUNE_LAB_SCREENSHOTS", ROOT/"runs"/"screenshots"))
# Chromium's background services reach for Google's hosts; on a closed network they only make noise and delays
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

if not Path(CHROMIUM).exists():
    why = f"no chromium at {CHROMIUM} (apt install chromium)"
    if os.environ.get("FINETUNE_LAB_REQUIRE_BROWSER"): raise RuntimeError(why)
    pytest.skip(why, allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _watch(page) -> list[str]:
    "Collect what would make a page broken: uncaught errors, failed requests, HTTP errors."
    problems = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    return problems


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The docs site, built from nbs/ and served on loopback."
    from finetune_lab.docs import build_docs
    out = build_docs(tmp_path_factory.mktemp("docs")/"site", ROOT/"nbs")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_docs_site_home_and_lesson(browser, site):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    problems = _watch(page)
    page.goto(f"{site}/index.html", wait_until="load")
    assert page.locator("main h1").first.inner_text().strip() == "finetune_lab"        # the README is the home page
    nav = page.eval_on_selector_all("nav ol li a", "els => els.map(e => e.getAttribute('href'))")
    assert nav[:26] == ["index.html", "core.html", "models.html", "data.html", "metrics.html", "train.html", "sft.html", "recipe.html", "noise.html", "datasize.html", "regularise.html", "convergence.html",
                        "federated.html", "dpo.html", "rlhf.html",
                        "evaluate.html", "bench.html", "deploy.html", "compress.html", "hpo.html", "cost.html", "distributed.html", "pipeline.html", "cli.html", "reliability.html", "docs.html"], nav   # the sidebar, in lesson order
    page.screenshot(path=str(SHOTS/"docs-home.png"), full_page=False)

    page.fill("#search", "LoRA adapter")                                              # search, then follow a hit
    page.wait_for_selector("#results li a")
    hits = page.locator("#results li a")
    assert hits.count() >= 1
    href = hits.first.get_attribute("href")
    hits.first.click(); page.wait_for_load_state("load")
    assert page.url.endswith(href)

    page.goto(f"{site}/sft.html", wait_until="load")
    assert "fine-tuning" in page.locator("main h1").inner_text().lower()
    assert page.locator("main h2").count() >= 3
    _plots_loaded(page, at_least=1)                                                   # the method comparison
    assert page.locator("main .doc h3#train_sft").count() == 1                         # API reference of an exported function
    text = page.inner_text("main")
    assert "#| export" not in text and "compare_steps, eval_rows = " not in text     # exported and #| hide cells are not shown
    page.screenshot(path=str(SHOTS/"docs-sft.png"), full_page=False)
    page.goto(f"{site}/data.html", wait_until="load")
    _plots_loaded(page, at_least=5)                                                   # the data report's plots
    assert not problems, problems


def _plots_loaded(page, at_least:int):
    "The page's plot images exist and decoded (a broken image has naturalWidth 0)."
    n = page.locator("main figure img").count()
    assert n >= at_least, n
    for i in range(n): page.locator("main figure img").nth(i).scroll_into_view_if_needed()
    page.wait_for_function("() => [...document.querySelectorAll('main figure img')].every(e => e.complete)")
    widths = page.eval_on_selector_all("main figure img", "els => els.map(e => e.naturalWidth)")
    assert all(w > 100 for w in widths), widths


def test_jupyterlab_runs_a_lesson(browser, tmp_path):
    "Start JupyterLab on loopback with a token, open 06_evaluate, run all cells, see a matplotlib plot and the A/B widget."
    SHOTS.mkdir(parents=True, exist_ok=True)
    root = tmp_path/"lab"; (root/"nbs").mkdir(parents=True)
    shutil.copy(ROOT/"nbs"/"06_evaluate.ipynb", root/"nbs")                         # a copy: the lesson file is never saved over
    (root/"data").symlink_to(ROOT/"data")
    settings = tmp_path/"settings"   # every cell in the page (JupyterLab 4 otherwise renders only the visible ones); no autosave
    (settings/"@jupyterlab"/"notebook-extension").mkdir(parents=True); (settings/"@jupyterlab"/"docmanager-extension").mkdir(parents=True)
    (settings/"@jupyterlab"/"notebook-extension"/"tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    (settings/"@jupyterlab"/"docmanager-extension"/"plugin.jupyterlab-settings").write_text('{"autosave": false}')
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "IN_TEST": "1", "FINETUNE_LAB_PROGRESS": "0", "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTER_CONFIG_DIR": str(tmp_path/"cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path/"runtime")}
    lab = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
                            f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--ServerApp.open_browser=False", "--allow-root"],
                           env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path/"lab.log", "wb"))
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try: urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2); break
            except OSError: time.sleep(0.5)
        else: pytest.fail("JupyterLab did not start: " + (tmp_path/"lab.log").read_text()[-2000:])
        with pytest.raises(urllib.error.HTTPError) as refused: urllib.request.urlopen(f"{base}/api/contents")
        assert refused.value.code == 403                                              # no token, no access
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/lab/tree/nbs/06_evaluate.ipynb?token={token}", wait_until="domcontentloaded")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        page.wait_for_function("() => document.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status === 'idle'"
                               " && /Idle/.test(document.querySelector('.jp-StatusBar-Widget')?.parentElement?.innerText ?? '')", timeout=90_000)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        deadline = time.time() + float(os.environ.get('FINETUNE_LAB_LAB_TIMEOUT', 600))
        while time.time() < deadline:                                                 # every cell run: no [*], last prompt numbered
            prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
            if prompts and not any("*" in p for p in prompts) and any(ch.isdigit() for ch in prompts[-1]): break
            time.sleep(2)
        else:
            page.screenshot(path=str(SHOTS/"jupyterlab-timeout.png"))
            pytest.fail("the notebook did not finish in 10 minutes (screenshot: jupyterlab-timeout.png)")
        tracebacks = page.locator(".jp-OutputArea-output", has_text="Traceback (most recent call last)")
        assert tracebacks.count() == 0, tracebacks.first.inner_text()[:2000]
        plots = page.locator(".jp-RenderedImage img")
        assert plots.count() >= 2                                                     # the comparison bars, the confusion matrices, the curves
        plots.first.scroll_into_view_if_needed()
        assert page.eval_on_selector(".jp-RenderedImage img", "e => e.naturalWidth") > 0
        page.screenshot(path=str(SHOTS/"jupyterlab-06_evaluate-plot.png"))
        widget = page.locator(".jp-OutputArea-output .jupyter-widgets button", has_text="A is better")
        widget.first.scroll_into_view_if_needed()
        assert widget.first.is_visible()                                              # the blind A/B widget rendered as a live widget
        page.screenshot(path=str(SHOTS/"jupyterlab-06_evaluate.png"))
        assert not errors, errors
    finally:
        lab.terminate()
        try: lab.wait(timeout=20)
        except subprocess.TimeoutExpired: lab.kill()
