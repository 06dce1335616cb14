"""``bvip report`` in a real browser: Debian's Chromium, headless, driven by Playwright through ``executable_path``.

The page opens from disk; every request that is not ``file:`` or ``data:`` is blocked and recorded, and there
must be none. Skips, with the reason, only where Playwright or Chromium is missing
(``scripts/setup_browser.sh``, run by ``make test``, installs Chromium).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from bvip_helpers import errors, report
from bvip_helpers.dataset import load_ground_truth
from bvip_helpers.io import read_jsonl, resolve

PAYLOAD = "Sidewalk: left. <img src=x onerror=alert(1)> Nearby: nothing close."
MODELS = ("zero-shot", "SFT", "DPO")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    executable = report.chromium_path()
    if executable is None:
        pytest.skip("no chromium on the PATH: scripts/setup_browser.sh installs it (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True)
        yield chromium
        chromium.close()


class Page:
    """A page of the report with every non-file, non-data request blocked and recorded, and console errors kept."""

    def __init__(self, browser, path: Path):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.blocked: list[str] = []
        self.console_errors: list[str] = []
        self.dialogs: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else self.blocked.append(r.url))
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.url = path.resolve().as_uri()

    def _route(self, route) -> None:
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def open(self, hash_: str = "") -> None:
        self.page.goto(self.url + hash_)
        self.page.wait_for_selector(".card, #sbs-table")

    def status(self) -> str:
        return self.page.inner_text("#status")

    def check_clean(self) -> None:
        assert self.blocked == [], f"the report made network requests: {self.blocked}"
        assert self.console_errors == [], self.console_errors
        assert self.dialogs == [], f"a caption ran script: {self.dialogs}"


def _predictions(rows: pd.DataFrame) -> dict[str, list[dict]]:
    """zero-shot: the original captions (no fields, no sections); SFT: the priority captions with a flipped sidewalk
    in every third image and no close objects in every fifth; DPO: the priority captions, one carrying markup."""
    sft = []
    for i, (path, response, sidewalk) in enumerate(zip(rows["image_path"], rows["response"], rows["sidewalk_pos"],
                                                       strict=True)):
        if i % 3 == 0 and sidewalk in ("left", "right"):
            response = response.replace(f"Sidewalk: {sidewalk}", f"Sidewalk: {'right' if sidewalk == 'left' else 'left'}")
        if i % 5 == 0:
            response = response.split("\nNearby:")[0] + "\nNearby: nothing close."
        sft.append({"image": path, "text": response})
    dpo = [{"image": p, "text": PAYLOAD if i == 0 else r} for i, (p, r) in enumerate(zip(rows["image_path"],
                                                                                      rows["response"], strict=True))]
    return {"zero-shot": [{"image": p, "text": t} for p, t in zip(rows["image_path"], rows["target"], strict=True)],
            "SFT": sft, "DPO": dpo}


@pytest.fixture(scope="module")
def built(tmp_path_factory, sample_dir) -> tuple[Path, list[dict]]:
    """The report of the committed sample's 44 training images, three models (132 cards)."""
    folder = tmp_path_factory.mktemp("report")
    captions, annotations = sample_dir / "complete_captions_sensation.csv", sample_dir / "annotations_with_obj_pos.csv"
    truth = load_ground_truth(captions, annotations)
    files = {}
    for label, preds in _predictions(truth[truth["split"] == "train"]).items():
        files[label] = folder / f"{label}.jsonl"
        files[label].write_text("".join(json.dumps(p) + "\n" for p in preds))
    page = report.build_report(files, captions, annotations, sample_dir, folder / "out", split="train")
    return page, read_jsonl(folder / "out" / "errors.jsonl")


def test_the_report_in_chromium(browser, built, tmp_path):
    path, records = built
    total, images = len(records), len({r["image"] for r in records})
    view = Page(browser, path)
    view.open()
    page = view.page
    assert view.status().startswith(f"{total} of {total} cards")
    cards = page.locator(".card")
    assert cards.count() == min(report.PAGE_SIZE, total)
    assert int(cards.first.get_attribute("data-severity")) == max(r["severity"] for r in records)
    severities = [int(s) for s in cards.evaluate_all("cards => cards.map(c => c.dataset.severity)")]
    assert severities == sorted(severities, reverse=True)
    assert page.locator(".card img").first.get_attribute("alt").startswith("Ground truth: Sidewalk:")

    # a facet filter: the cards with a critical miss, then only SFT's; the counts are the records'
    page.locator("#f-type-critical_miss").check()
    missed = [r for r in records if any(e["type"] == "critical_miss" for e in r["errors"])]
    assert missed and view.status().startswith(f"{len(missed)} of {total} cards")
    assert cards.count() == min(report.PAGE_SIZE, len(missed))
    page.locator("#f-model-1").check()
    sft_missed = [r for r in missed if r["model"] == "SFT"]
    assert view.status().startswith(f"{len(sft_missed)} of {total} cards")
    assert page.locator(".card h3").all_inner_texts() == [f"{r['image']} · SFT" for r in sorted(
        sft_missed, key=lambda r: (-r["severity"], r["image"]))][: report.PAGE_SIZE]
    assert "type=critical_miss" in page.evaluate("location.hash") and "model=1" in page.evaluate("location.hash")
    page.reload()  # the filter state lives in the URL hash
    page.wait_for_selector(".card")
    assert view.status().startswith(f"{len(sft_missed)} of {total} cards")
    assert page.locator("#f-model-1").is_checked()

    # keyboard: j moves to the next card
    page.locator("#f-type-critical_miss").uncheck()
    cards.first.focus()
    page.keyboard.press("j")
    assert page.evaluate("document.activeElement.dataset.index") == cards.nth(1).get_attribute("data-index")

    # side by side: one row per image; disagreement; A wrong, B right, by the severity difference
    view.open("#view=sbs&size=100")
    assert view.status().startswith(f"{images} of {images} images")
    assert page.locator("#sbs-table tbody tr").count() == images
    claims = {}
    for r in records:
        claims.setdefault(r["image"], set()).add(json.dumps([r["prediction"]["fields"], r["prediction"]["near"]],
                                                            sort_keys=True))
    page.locator("#sbs-disagree").check()
    disagree = sum(len(c) > 1 for c in claims.values())
    assert view.status().startswith(f"{disagree} of {images} images")
    page.locator("#sbs-disagree").uncheck()
    page.locator("#sbs-a").select_option("1")
    page.locator("#sbs-b").select_option("2")
    page.locator("#sbs-awrong").check()
    severity = {(r["model"], r["image"]): r["severity"] for r in records}
    wrong = {(r["model"], r["image"]) for r in records if r["errors"]}
    deltas = sorted((severity["SFT", i] - severity["DPO", i] for i in claims
                     if ("SFT", i) in wrong and ("DPO", i) not in wrong), reverse=True)
    assert deltas and view.status().startswith(f"{len(deltas)} of {images} images")
    assert page.locator("#sbs-table tbody tr td.diffsev").all_inner_texts()[:3] == [f"+{d}" for d in deltas[:3]]

    # a caption with markup is text: no element made from it, no script run
    view.open("#model=2")
    first = page.locator(".card").first
    assert "<img src=x onerror=alert(1)>" in first.locator(".caption").inner_text()
    assert page.locator("img[src='x']").count() == 0
    view.check_clean()

    view.open("#size=4")  # the summary and the first cards
    screenshot = page.screenshot(full_page=True)
    for target in (tmp_path / "report_screenshot.png", resolve("runs/report_screenshot.png")):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(screenshot)
    view.check_clean()
    view.context.close()


def test_a_card_without_its_picture_says_why(browser, sample_dir, tmp_path):
    root = Path(shutil.copytree(sample_dir, tmp_path / "root"))
    captions, annotations = root / "complete_captions_sensation.csv", root / "annotations_with_obj_pos.csv"
    rows = load_ground_truth(captions, annotations).query("split == 'test'")
    (root / rows["image_path"].iloc[0]).write_bytes(b"not a JPEG")
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"image": p, "text": r}) + "\n" for p, r in zip(rows["image_path"],
                                                                                       rows["response"], strict=True)))
    path = report.build_report({"SFT": preds}, captions, annotations, root, tmp_path / "out", skip_bad_images=True)
    view = Page(browser, path)
    view.open("#size=100")
    missing = view.page.locator(".card .noimage")
    assert missing.count() == 1 and missing.inner_text().startswith("No picture: image unreadable or corrupt")
    assert view.page.locator(".card img").count() == len(rows) - 1  # no other picture stands in for it
    view.open("#view=sbs&size=100")
    assert view.page.locator("#sbs-table .noimage").count() == 1
    view.check_clean()
    view.context.close()


def test_five_thousand_cards_stay_usable(browser, sample_dir, tmp_path, monkeypatch):
    """5,148 cards (1,716 images x 3 models): one page in the DOM, first cards within seconds, filters work."""
    monkeypatch.setattr(report, "thumbnail_uri", lambda *args, **kwargs: "data:image/gif;base64,R0lGODlhAQABAAAAACw=")
    truth = load_ground_truth(sample_dir / "complete_captions_sensation.csv",
                              sample_dir / "annotations_with_obj_pos.csv")
    train = truth[truth["split"] == "train"]
    copies = []
    for k in range(39):
        copy = train.copy()
        copy["image"] = f"c{k:02d}_" + copy["image"]
        copy["image_path"] = "training/images/" + copy["image"]
        copies.append(copy)
    big = pd.concat(copies, ignore_index=True)
    records = errors.build_records(_predictions(big), big, "train")
    assert len(records) > 5000
    path = report.write_report(records, sample_dir, tmp_path / "big")
    view = Page(browser, path)
    view.open()
    assert view.page.locator(".card").count() == report.PAGE_SIZE
    ready_ms = view.page.evaluate("window.bvipReport.readyAt")
    assert ready_ms < 5000, f"first cards after {ready_ms:.0f} ms"
    view.page.locator("#f-type-field_flipped").check()
    flipped = Counter(e["type"] for r in records for e in {x["type"]: x for x in r["errors"]}.values())["field_flipped"]
    assert view.status().startswith(f"{flipped} of {len(records)} cards")
    view.check_clean()
    view.context.close()


def test_chromium_path_honours_the_override(monkeypatch, tmp_path):
    fake = tmp_path / "my-chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("BVIP_CHROMIUM", str(fake))
    assert report.chromium_path() == str(fake)
    monkeypatch.setenv("BVIP_CHROMIUM", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert report.chromium_path() is None
    assert shutil.which("chromium") is None
