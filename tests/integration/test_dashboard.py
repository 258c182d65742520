"""The live fleet page (`GET /dashboard`) in a real headless Chromium (Debian's, driven by Playwright) against a real
gateway and simulated workers: it renders the fleet, shows a worker added through the API, turns a failing worker red,
and fills in the per-worker figures once traffic flows. The screenshot is kept under the test's tmp_path."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support.components import require
from tests.support.gateway import start_gateway
from tests.support.processes import http_request, start_sim

FAST_HEALTH = ("--health-check-interval-secs", "0.2", "--health-check-timeout-secs", "0.5",
               "--health-failure-threshold", "2", "--health-success-threshold", "1")  # fmt: skip
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]  # fmt: skip
RED = "rgb(198, 40, 40)"  # --bad in dashboard.html


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = require("chromium")
    expect.set_options(timeout=10_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def row(page: Page, url: str):
    return page.locator(f'tbody#workers tr[data-url="{url}"]')


def cell(page: Page, url: str, column: str):
    return row(page, url).locator(f'td[data-col="{column}"]')


def test_fleet_page_tracks_the_fleet_live(tmp_path, browser):
    with start_sim(tmp_path, 3) as sims, start_gateway(tmp_path, sims.urls[:2], *FAST_HEALTH) as gw:
        first, second, added = sims.urls
        page = browser.new_page(viewport={"width": 1500, "height": 420})
        page.goto(gw.url + "/dashboard")
        expect(page.locator("tbody#workers tr")).to_have_count(2)
        for url in (first, second):
            expect(row(page, url)).to_have_attribute("data-state", "ok")
            expect(cell(page, url, "status")).to_have_text("ready")
            expect(cell(page, url, "circuit_state")).to_have_text("closed")
            expect(cell(page, url, "model")).to_have_text("sim-model")
        expect(page.locator("#ready")).to_have_text("2")

        # traffic after the page's first look: requests/s, TTFT and (a repeated prompt) cache hits appear
        prompt = "the same long prefix, over and over, so the engine's prefix cache serves it " * 8
        for _ in range(8):
            status, body = gw.post("/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 4}})
            assert status == 200, body
        expect(page.locator("#rps")).not_to_have_text(re.compile("^(\u2013|0\\.0)$"))
        hits = page.locator('td[data-col="cache_hit_rate"]', has_text=re.compile(r"^[1-9]\d*(\.\d)?%$"))
        expect(hits.first).to_be_visible()
        expect(
            page.locator('td[data-col="ttft_p99_ms"]', has_text=re.compile(r"\d+(\.\d+)? m?s$")).first
        ).to_be_visible()

        status, body = gw.post("/workers", {"url": added})
        assert status == 202, body
        expect(row(page, added)).to_have_attribute("data-state", "ok")
        expect(page.locator("#total")).to_have_text("3")

        sims.ctl(0, health_status=503)
        expect(row(page, first)).to_have_attribute("data-state", "bad")
        expect(cell(page, first, "status").locator("span")).to_have_css("background-color", RED)
        expect(row(page, second)).to_have_attribute("data-state", "ok")

        screenshot = tmp_path / "dashboard.png"
        page.screenshot(path=str(screenshot), full_page=True)
        print(f"fleet page screenshot: {screenshot}")
        assert screenshot.stat().st_size > 0


def test_fleet_page_and_data_are_admin_reads(tmp_path):
    with start_sim(tmp_path, 1) as sims, start_gateway(tmp_path, sims.urls, api_key="sk-ops") as gw:
        for path in ("/dashboard", "/dashboard/data"):
            assert http_request("GET", gw.url + path)[0] == 401
        status, page = http_request("GET", gw.url + "/dashboard", headers={"Authorization": "Bearer sk-ops"})
        assert status == 200 and "<title>Shepherd fleet</title>" in page
        status, data = http_request("GET", gw.url + "/dashboard/data", headers={"Authorization": "Bearer sk-ops"})
        assert status == 200 and [w["url"] for w in data["workers"]] == sims.urls
