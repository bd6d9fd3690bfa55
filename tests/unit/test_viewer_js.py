"""The viewer's result panel (serve/static/app.js ``render``) run under Node with a stub page.

The browser test (tests/integration/test_browser.py) drives the real page where Chromium is
installed; this one needs only ``node`` and checks what the panel says for a prediction, in
particular the out-of-distribution warning. Skipped, with the reason, without node.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

APP_JS = Path(__file__).resolve().parents[2] / "src" / "bonecluster" / "serve" / "static" / "app.js"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="no node executable on PATH")

# A stub DOM: every id is an element that records text, class, hidden and children; render()
# is called on the prediction given as argv[2] and the elements come back as JSON.
HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const elements = {};
function stub() {
  return { textContent: "", className: "", hidden: true, style: {}, children: [], attrs: {},
           setAttribute(k, v) { this.attrs[k] = v; }, removeAttribute(k) { delete this.attrs[k]; },
           getAttribute(k) { return this.attrs[k]; }, append(c) { this.children.push(c); },
           replaceChildren() { this.children = []; }, addEventListener() {} };
}
const document = {
  getElementById: (id) => (elements[id] = elements[id] || stub()),
  createElement: () => stub(), querySelectorAll: () => [], addEventListener() {},
};
const context = vm.createContext({ document, console });
vm.runInContext(fs.readFileSync(process.argv[1], "utf8") + "\nthis.render = render;", context);
context.render(JSON.parse(process.argv[2]));
const out = {};
for (const [id, e] of Object.entries(elements)) out[id] = { text: e.textContent, cls: e.className, hidden: e.hidden };
console.log(JSON.stringify(out));
"""

PREDICTION = {
    "path": "film.png", "image_url": "/api/results/x/image.png", "heatmap_url": None, "heatmap_layer": None,
    "cluster": 3, "cluster_name": "HUMERUS", "confidence": 0.88, "part": "HUMERUS", "score": 0.4,
    "threshold": 0.5, "abnormal": False, "stage2_cluster": None, "stage2_cluster_name": None, "neighbours": [],
}


def _render(**changes) -> dict:
    prediction = json.dumps({**PREDICTION, **changes})
    done = subprocess.run([NODE, "-e", HARNESS, str(APP_JS), prediction], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_typical_film_shows_its_part_and_confidence():
    page = _render(typicality=57.0, in_distribution=True)
    assert page["ood-warning"]["hidden"] is True
    assert page["part"]["text"] == "HUMERUS" and "doubtful" not in page["part"]["cls"]
    assert page["confidence"]["text"] == "cluster 3, confidence 88%, typicality 57%"


def test_an_atypical_film_gets_a_warning_and_no_confident_part():
    page = _render(typicality=0.2, in_distribution=False)
    warning = page["ood-warning"]
    assert warning["hidden"] is False
    assert "Unlike the films this run was trained on" in warning["text"] and "0.2%" in warning["text"]
    assert page["part"]["text"] == "HUMERUS?" and "doubtful" in page["part"]["cls"]
    assert "confidence" not in page["confidence"]["text"] and "out of distribution" in page["confidence"]["text"]


def test_a_run_without_the_flag_says_nothing_about_it():
    page = _render(typicality=None, in_distribution=None)
    assert page["ood-warning"]["hidden"] is True
    assert page["confidence"]["text"] == "cluster 3, confidence 88%"
