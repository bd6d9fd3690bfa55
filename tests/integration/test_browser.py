"""The viewer page in a real headless browser: Playwright driving the system Chromium.

It never downloads a browser: it uses the ``chromium`` on PATH (Debian's package) and is skipped,
with the reason, when Playwright or that executable is missing. ``BONECLUSTER_SCREENSHOT=1``
also writes the screenshot to docs/viewer.png (on a somewhat larger run, for a readable picture).
"""

from __future__ import annotations

import json
import re
import os
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import serve_in_thread, train_tiny_run

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = os.environ.get("BONECLUSTER_SCREENSHOT") == "1"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python package) is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable on PATH or at /usr/bin/chromium "
                                                          "(apt-get install chromium); no browser is downloaded")


@pytest.fixture(scope="module")
def server(tmp_path_factory, single_torch_thread):
    from bonecluster.serve import create_app

    root = tmp_path_factory.mktemp("browser")
    # the screenshot run: bigger phantoms at the cpu preset's 64 px, so the page is worth looking at
    extra = ["--set", "data.size=64", "--set", "train.epochs=6"] if SCREENSHOT else []
    run, phantoms = train_tiny_run(root, n=84 if SCREENSHOT else 42, size=256 if SCREENSHOT else 64, extra=extra)
    with serve_in_thread(create_app(run)) as url:
        yield url, run, phantoms


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_upload_shows_part_score_heatmap_and_neighbours(server, browser, tmp_path):
    url, run, phantoms = server
    image = sorted(phantoms.glob("train/XR_WRIST/**/*.png"))[0]
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: problems.append(f"external request {r.url}") if not r.url.startswith(url) else None)
    page.goto(url + "/")
    sync_api.expect(page.locator("#run")).to_contain_text("training images")
    page.set_input_files("#file", str(image))
    sync_api.expect(page.locator("#result")).to_be_visible(timeout=60_000)

    part = page.locator("#part").inner_text()
    assert part and part != "-"
    sync_api.expect(page.locator("#confidence")).to_contain_text("confidence")
    sync_api.expect(page.locator("#score")).to_contain_text("threshold")
    assert page.locator("#verdict").inner_text() in ("Flagged abnormal", "Within normal range")
    fill = page.locator("#gauge-fill").evaluate("e => e.getBoundingClientRect().width")
    assert fill > 0
    page.wait_for_function("() => { const h = document.getElementById('heatmap');"
                           " return h.complete && h.naturalWidth === 256 && !h.hidden; }")
    page.wait_for_function("() => document.getElementById('image').naturalWidth === 256")
    page.wait_for_function("() => { const i = [...document.querySelectorAll('#neighbours img')];"
                           " return i.length === 8 && i.every(x => x.complete && x.naturalWidth > 0); }")
    assert page.locator("#neighbours figcaption").count() == 8

    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if SCREENSHOT:
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "viewer.png")
    assert not problems, problems
    page.close()


def test_cluster_browser_names_a_cluster(server, browser):
    url, run, _ = server
    page = browser.new_page()
    page.goto(url + "/")
    page.click("#tab-clusters")
    sync_api.expect(page.locator("#gallery article")).to_have_count(7)  # stage 1, k = 7
    page.wait_for_function("() => { const i = [...document.querySelectorAll('#gallery img')];"
                           " return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0); }")
    page.select_option("#stage-select", "stage2/HAND")
    sync_api.expect(page.locator("#gallery article")).to_have_count(2)
    card = page.locator("#gallery article").nth(1)
    card.locator("input").fill("HAND <healed fracture>")
    card.locator("button").click()
    sync_api.expect(card.locator(".rename span")).to_have_text("saved")
    assert json.loads((run / "stage2" / "HAND" / "names.json").read_text())["1"] == "HAND <healed fracture>"
    card.locator("input").fill("   ")
    card.locator("button").click()
    sync_api.expect(card.locator(".rename span")).to_contain_text("cannot be empty")
    page.close()


def test_an_atypical_film_is_shown_with_a_warning(server, browser):
    """The page's side of the out-of-distribution flag: the server's answer is marked atypical
    on its way to the page (a tiny phantom run has no notion of typical to test it on)."""
    url, _, phantoms = server
    image = sorted(phantoms.glob("train/XR_HAND/**/*.png"))[0]
    page = browser.new_page()

    def atypical(route):
        # Chromium does not hand an <input type=file> upload's body to a route, so the server is
        # asked directly and its answer passed on, marked atypical
        import httpx

        answer = httpx.post(url + "/api/predict", files={"file": (image.name, image.read_bytes(), "image/png")})
        body = answer.json()
        assert answer.status_code == 200 and body["in_distribution"] is True, body   # as the server sees it
        route.fulfill(status=200, json={**body, "in_distribution": False, "typicality": 0.4})

    page.route("**/api/predict", atypical)
    page.goto(url + "/")
    page.set_input_files("#file", str(image))
    sync_api.expect(page.locator("#result")).to_be_visible(timeout=60_000)
    sync_api.expect(page.locator("#ood-warning")).to_be_visible()
    sync_api.expect(page.locator("#ood-warning")).to_contain_text("typicality 0.4%")
    sync_api.expect(page.locator("#part")).to_contain_text("?")
    sync_api.expect(page.locator("#confidence")).to_contain_text("out of distribution")
    assert "confidence" not in page.locator("#confidence").inner_text()
    page.close()


def test_naming_flow_by_keyboard_then_an_upload_reports_the_named_part(server, browser):
    import httpx

    url, run, phantoms = server
    names_file = run / "stage1" / "names.json"
    original = names_file.read_text()
    listing = httpx.get(url + "/api/clusters?per_cluster=0").json()
    stage1 = next(s for s in listing["stages"] if s["key"] == "stage1")
    for c in stage1["clusters"]:   # start from unnamed clusters, as on unlabelled films
        assert httpx.post(url + c["rename_url"], json={"name": f"cluster-{c['id']}"}).status_code == 200
    by_size = sorted(stage1["clusters"], key=lambda c: (-c["size"], c["id"]))
    assert all(len(c["central"]) == min(12, c["size"]) for c in stage1["clusters"])
    assert all(not set(c["edge"]) & set(c["central"]) for c in stage1["clusters"])
    film = sorted(phantoms.glob("train/XR_ELBOW/**/*.png"))[0]
    before = httpx.post(url + "/api/predict", files={"file": (film.name, film.read_bytes(), "image/png")}).json()
    assert before["cluster_name"] == f"cluster-{before['cluster']}"

    page = browser.new_page()
    try:
        page.goto(url + "/")
        page.click("#tab-naming")
        sync_api.expect(page.locator("#naming-list article")).to_have_count(len(by_size))
        sync_api.expect(page.locator("#naming-counter")).to_have_text(f"0 of {len(by_size)} named")
        cards = page.locator("#naming-list article")
        sync_api.expect(cards.nth(0)).to_have_class(re.compile(r"\bcurrent\b"))
        sync_api.expect(cards.nth(0).locator("img")).to_have_count(len(by_size[0]["central"]) + len(by_size[0]["edge"]))
        given = {}
        picks = (("4", "HAND"), ("7", "WRIST"), ("1", "ELBOW"))
        for key, _ in picks:   # back to back: each key names the current cluster and moves on at once
            page.keyboard.press(key)
        for i, (_, part) in enumerate(picks):
            sync_api.expect(cards.nth(i).locator(".current-name")).to_have_text(part)
            given[by_size[i]["id"]] = part
        sync_api.expect(page.locator("#naming-counter")).to_have_text(f"3 of {len(by_size)} named")
        if before["cluster"] not in given:   # the film's own cluster: pick it and name it too
            page.click(f"#naming-{before['cluster']} header")
            page.keyboard.press("2")
            given[before["cluster"]] = "FINGER"
            sync_api.expect(page.locator("#naming-counter")).to_have_text(f"4 of {len(by_size)} named")
        saved = json.loads(names_file.read_text())
        assert {int(k): v for k, v in saved.items() if v in given.values()} == given

        page.click("#tab-predict")
        page.set_input_files("#file", str(film))
        sync_api.expect(page.locator("#part")).to_have_text(given[before["cluster"]], timeout=60_000)
    finally:
        page.close()
        for c in stage1["clusters"]:   # the other tests see the run's own names again
            httpx.post(url + c["rename_url"], json={"name": json.loads(original)[str(c["id"])]})
