"""flow.html in a real browser (Debian's chromium driven by Playwright), used as a person would: it loads
with no error and no request, hovering a token redraws the map, clicking pins it, pins add up, the
arrow keys step, the compare page's controls drive both columns. Screenshots go to
``SALIENCY_R1_SCREENSHOTS`` (default ``runs/screenshots``).

Without the browser the tests skip, saying why; CI installs it and sets
``SALIENCY_R1_BROWSER_TESTS=required``, where a missing browser is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from saliency_r1.data.synthetic import SyntheticGroundedVQA

CHROMIUM = os.environ.get("SALIENCY_R1_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
SCREENSHOTS = Path(os.environ.get("SALIENCY_R1_SCREENSHOTS", Path(__file__).resolve().parents[1] / "runs" / "screenshots"))


@pytest.fixture(scope="module")
def browser():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install 'saliency-r1[browser]')"
    if missing is None and not Path(CHROMIUM).exists():
        missing = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("SALIENCY_R1_BROWSER_TESTS") == "required":
            pytest.fail(f"browser tests are required here, but {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def pages(hub_folder, tmp_path_factory):
    """Three pages written by explain: a generated answer, a malformed given one, and the two compared."""
    from saliency_r1.explain import explain
    from saliency_r1.models import resolve_model

    source = resolve_model(hub_folder)
    model, processor = source.load("cpu", torch.float32), source.processor()
    record = SyntheticGroundedVQA(1, seed=21)[0]
    good = explain(model, processor, record["image"], record["problem"], boxes=record["bbox"],
                   completion="<think>red dark</think><answer>dark</answer>", model_name="tiny (given completion)")
    bad = explain(model, processor, record["image"], record["problem"], boxes=record["bbox"],
                  completion="it is dark", model_name="tiny (malformed)")
    folder = tmp_path_factory.mktemp("pages")
    return {"good": good.save(folder / "good")["flow"], "bad": bad.save(folder / "bad")["flow"],
            "compare": good.save(folder / "compare", compare=bad)["flow"]}


class Page:
    def __init__(self, browser, path: Path, width: int = 1000):
        self.page = browser.new_page(viewport={"width": width, "height": 1100})
        self.errors, self.requests = [], []
        self.page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)
        self.page.wait_for_function("document.querySelectorAll('canvas.map').length > 0")
        self.page.wait_for_timeout(200)  # the images decode

    def pixels(self, panel: int = 0) -> str:
        """The map canvas's pixels, as the browser encodes them losslessly (equal strings: equal pixels)."""
        return self.page.evaluate(f"""() => document.querySelectorAll('section.panel')[{panel}]
            .querySelector('canvas.map').toDataURL('image/png')""")

    def token(self, kind: str, panel: int = 0, nth: int = 0):
        return self.page.locator(f"section.panel >> nth={panel}").locator(f".tok.{kind}.has-map").nth(nth)

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        assert not self.errors, self.errors
        assert self.requests == [self.url], self.requests  # the page itself, nothing else
        self.page.close()


def test_hovering_pinning_and_stepping_redraw_the_map(browser, pages):
    page = Page(browser, pages["good"])
    answer_map = page.pixels()
    page.token("think").hover()
    think_map = page.pixels()
    assert think_map != answer_map  # the think token's own map of the image
    page.shot("flow-hover-think-token")
    page.token("think").click()
    page.page.mouse.move(5, 5)  # away from every token: the pinned map stays
    assert page.pixels() == think_map
    assert page.token("think").get_attribute("class").split().count("pinned") == 1
    page.token("answer").click()  # a second pin: the sum of both
    page.page.mouse.move(5, 5)
    both = page.pixels()
    assert both not in (think_map, answer_map)
    page.page.keyboard.press("Escape")
    assert page.pixels() == answer_map
    page.page.keyboard.press("ArrowRight")
    first = page.pixels()
    page.page.keyboard.press("ArrowRight")
    assert page.pixels() != first  # the next token's map
    canvas = page.page.locator("canvas.map").first
    canvas.hover(position={"x": 40, "y": 40})
    assert "rank" in page.page.locator(".tooltip").first.inner_text()
    page.page.locator("#grid").check()
    page.shot("flow-pinned-grid")
    page.close()


def test_the_compare_page_drives_both_columns(browser, pages):
    page = Page(browser, pages["compare"], width=1500)
    before = [page.pixels(0), page.pixels(1)]
    page.page.locator("#opacity").fill("95")
    after = [page.pixels(0), page.pixels(1)]
    assert after[0] != before[0]
    page.page.locator("#cmap").select_option("magma")
    assert page.pixels(0) != after[0]
    page.token("direct", panel=1).hover()  # the malformed side: its tokens' direct-path maps
    assert page.pixels(1) != page.pixels(0)
    page.shot("flow-compare")
    page.close()


def test_a_malformed_completion_says_so(browser, pages):
    page = Page(browser, pages["bad"])
    banner = page.page.locator(".banner").inner_text()
    assert "not well formed" in banner and "saliency reward is 0" in banner and "direct" in banner
    empty = page.pixels()
    drawn = []
    for nth in range(page.page.locator("section.panel >> nth=0").locator(".tok.direct.has-map").count()):
        page.token("direct", nth=nth).hover()
        drawn.append(page.pixels() != empty)
    assert any(drawn)  # a token whose direct map is negative everywhere draws nothing after relu; the others do
    assert "direct-path" in page.page.locator("figcaption").first.inner_text()
    page.shot("flow-malformed")
    page.close()
