"""Benchmark ``bvip report``: the error gallery of 1,000 images x 3 models, built and opened in Chromium.

    python benchmarks/bench_report.py [--n 1000] [--seed 0]

Inputs: ``bvip synth`` scenes (every split scored as one) and three "models" made by perturbing the scenes'
ground-truth priority captions at different rates: ``zero-shot`` (mostly the original, unformatted captions),
``SFT`` and ``DPO`` (fewer and fewer flipped sides, dropped, invented or moved close objects, sections out of
order). Reports the time to build the records and the page (thumbnails included), the page's size, and the
time until the first cards show in headless Chromium opened from disk (no request may leave the file), plus
how long one facet filter takes. Writes ``runs/benchmarks/report.json``.
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from bvip_helpers import errors, report
from bvip_helpers.dataset import load_ground_truth
from bvip_helpers.demo.synth import generate_dataset
from bvip_helpers.io import resolve, write_json

#: Per model: the chance that a caption is the original one, and the chance of each mistake in the others.
MODELS = {"zero-shot": (0.7, 0.3), "SFT": (0.0, 0.15), "DPO": (0.0, 0.07)}


def perturb(response: str, target: str, rng: random.Random, original_rate: float, mistake_rate: float) -> str:
    """A model's caption: the original caption, or the priority caption with a few typical mistakes."""
    if rng.random() < original_rate:
        return target
    text = response
    if rng.random() < mistake_rate:  # the sidewalk on the other side
        text = re.sub(r"Sidewalk: (left|right)", lambda m: "Sidewalk: " + ("right" if m.group(1) == "left" else "left"),
                      text, count=1)
    if rng.random() < mistake_rate:  # the first close object dropped
        text = re.sub(r"Nearby: [^;.\n]+(; )?", lambda m: "Nearby: " if m.group(1) else "Nearby: nothing close",
                      text, count=1)
    if rng.random() < mistake_rate:  # a car that is not there
        text = text.replace("Nearby: nothing close", "Nearby: a car close on the left").replace(
            "Nearby: ", "Nearby: a bicycle close on the right; ", 1)
    if rng.random() < mistake_rate:  # a close object on the other side
        text = re.sub(r"close on the (left|right)", lambda m: "close on the " + ("right" if m.group(1) == "left"
                                                                                 else "left"), text, count=1)
    if rng.random() < mistake_rate / 2:  # Nearby before the mandatory fields
        head, _, rest = text.partition("\n")
        text = rest + "\n" + head
    return text


def build_inputs(folder: Path, n: int, seed: int) -> tuple[pd.DataFrame, dict[str, list[dict]], Path]:
    paths = generate_dataset(folder / "scenes", n=n, seed=seed, show_progress=False, masks=False)
    truth = load_ground_truth(paths["captions_csv"], paths["annotations_csv"]).assign(split="test")
    rng = random.Random(seed)
    predictions = {label: [{"image": path, "text": perturb(response, target, rng, *rates)}
                           for path, response, target in zip(truth["image_path"], truth["response"], truth["target"],
                                                             strict=True)]
                   for label, rates in MODELS.items()}
    return truth, predictions, paths["image_root"]


def time_in_chromium(page_path: Path, expected_filtered: int) -> dict[str, object]:
    """Seconds until the first cards show (from navigation, and the page's own clock), and one filter's time."""
    executable = report.chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"skipped": "playwright is not installed"}
    if executable is None:
        return {"skipped": "no chromium on the PATH (scripts/setup_browser.sh)"}
    blocked: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else blocked.append(r.url))
        start = time.perf_counter()
        page.goto(page_path.resolve().as_uri(), wait_until="commit")
        page.wait_for_selector(".card")
        first_cards_s = time.perf_counter() - start
        ready_ms = page.evaluate("window.bvipReport.readyAt")
        start = time.perf_counter()
        page.locator("#f-type-critical_miss").check()
        page.wait_for_function(f"document.getElementById('status').textContent.startsWith('{expected_filtered} of')")
        filter_s = time.perf_counter() - start
        browser.close()
    assert not blocked, f"the report made network requests: {blocked}"
    return {"first_cards_s": round(first_cards_s, 3), "page_ready_ms": round(ready_ms, 1),
            "filter_critical_miss_s": round(filter_s, 3), "network_requests": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images (default: 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench_report_"))
    try:
        truth, predictions, image_root = build_inputs(scratch, args.n, args.seed)
        start = time.perf_counter()
        records = errors.build_records(predictions, truth, "test")
        records_s = time.perf_counter() - start
        start = time.perf_counter()
        page = report.write_report(records, image_root, scratch / "report")
        page_s = time.perf_counter() - start
        size = page.stat().st_size
        thumbs = sum(len(t) for t in re.findall(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", page.read_text()))
        critical = sum(any(e["type"] == "critical_miss" for e in r["errors"]) for r in records)
        browser = time_in_chromium(page, critical)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "images": len(truth), "models": list(MODELS), "cards": len(records),
        "build_records_s": round(records_s, 3), "write_report_s": round(page_s, 3),
        "build_total_s": round(records_s + page_s, 3),
        "index_html_bytes": size, "index_html_mb": round(size / 1e6, 2), "thumbnail_bytes": thumbs,
        "chromium": browser, "summary": errors.summarize(records).round(3).to_dict("records"),
        "python": platform.python_version(), "machine": platform.machine(),
    }
    print(f"{'step':<44}{'value':>12}")
    print(f"{'error records (' + str(len(records)) + ' cards)':<44}{records_s:>10.2f} s")
    print(f"{'index.html with ' + str(len(truth)) + ' thumbnails':<44}{page_s:>10.2f} s")
    print(f"{'size of index.html':<44}{size / 1e6:>9.1f} MB  (thumbnails {thumbs / 1e6:.1f} MB)")
    if "skipped" in browser:
        print(f"Chromium: skipped ({browser['skipped']})")
    else:
        print(f"{'Chromium: first cards shown after':<44}{browser['first_cards_s']:>10.2f} s  "
              f"(page script done at {browser['page_ready_ms']:.0f} ms)")
        print(f"{'Chromium: filter on critical misses':<44}{browser['filter_critical_miss_s']:>10.2f} s")
    out = write_json(resolve("runs/benchmarks/report.json"), result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
