"""The page at /ui in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`, which
.ci/run installs) driven by Selenium, against the server as a real process. What the page highlights
must be exactly what the API answers for the same request: the same spans (text, start, end), labels
and count, with the whole text shown in place, for CJK, emoji, right-to-left and over-long texts,
and the API's own error messages. Without a browser the browser tests skip, saying what is missing;
CHROMIUM and CHROMEDRIVER (environment) point them at other binaries.

The screenshot in the README (docs/ui.png) is made here, on the shared real checkpoint when present."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import REAL_CHECKPOINT, ROOT, ServerProcess

SEED = "Apple is looking at buying U.K. startup for $1 billion"
CJK = "Apple在东京和北京开设了新店，Tim Cook出席了开幕式。李明在上海工作。"
EMOJI = "🚀🎉 Angela Merkel visited Paris 🇫🇷 with Emmanuel Macron"
RTL = "التقت Angela Merkel بالرئيس Emmanuel Macron في Paris، והם ביקרו את Siemens בירושלים"
LONG = " ".join(
    f"In {1900 + i} Angela Merkel met Emmanuel Macron in Paris to talk about Siemens, Airbus and the European Union."
    for i in range(150)
)  # about 3,500 tokens: the server reads it in overlapping windows
MAX_TEXTS = 8
KEY = "ui-test-key"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or ""
CHROMEDRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver") or ""

# One round trip reads every rendered text and span back (a WebDriver call per element would take seconds).
READ_DOCS = """
return Array.from(document.querySelectorAll('#docs .doc')).map(doc => ({
  index: Number(doc.dataset.index), dir: doc.dir, text: doc.textContent,
  spans: Array.from(doc.querySelectorAll('.ent, .tok')).map(el => ({
    shown: el.textContent, start: Number(el.dataset.start), end: Number(el.dataset.end),
    label: el.dataset.label, score: Number(el.dataset.score), title: el.title,
    beside: getComputedStyle(el, '::after').content})),
}));
"""


@pytest.fixture(scope="module")
def checkpoint(built) -> Path:
    """The shared real checkpoint (real entities, the README's screenshot), else one the tests build."""
    return REAL_CHECKPOINT if REAL_CHECKPOINT.is_dir() else built("wordpiece-cased")


@pytest.fixture(scope="module")
def server(checkpoint):
    process = ServerProcess({"CHECKPOINT": str(checkpoint), "ENGINE": "onnxruntime", "MAX_TEXTS": str(MAX_TEXTS)})
    process.wait_ready()
    yield process
    assert process.stop(), process.output()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from Debian's packages, its driver named explicitly so Selenium never downloads one."""
    pytest.importorskip("selenium", reason="selenium is not installed (requirements-dev.txt pins it: make install)")
    missing = [
        f"{name} ({path or 'not on PATH'})"
        for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER))
        if not (path and os.access(path, os.X_OK))
    ]
    if missing:
        pytest.skip(
            f"no browser for the page tests: {', '.join(missing)} missing; "
            "`apt-get install chromium chromium-driver` (.ci/run does) or set CHROMIUM and CHROMEDRIVER"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_page(browser, url: str, ready: str = "#legend li") -> None:
    """Load /ui and wait until it has asked /info (the legend is filled, or the key field shows)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/ui")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ready))


@pytest.fixture
def page(browser, server):
    open_page(browser, server.url)
    return browser


def submit(browser, texts: list[str], strategy: str, per_line: bool = True) -> None:
    """Fill the box as a person would, pick the strategy, press Send and wait for the answer. The box is
    filled by script: ChromeDriver cannot type characters beyond the BMP, such as emoji."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    box = browser.find_element(By.ID, "texts")
    browser.execute_script("arguments[0].value = arguments[1]", box, "\n".join(texts))
    Select(browser.find_element(By.ID, "strategy")).select_by_value(strategy)
    tick = browser.find_element(By.ID, "per-line")
    if tick.is_selected() != per_line:
        tick.click()
    result = browser.find_element(By.ID, "result")
    before = int(result.get_attribute("data-requests"))
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 120).until(lambda _: int(result.get_attribute("data-requests")) > before)


def ask_api(server, texts: list[str], strategy: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """The same request the page sends, straight to the API."""
    body = {"inputs": texts, "aggregation_strategy": strategy}
    return httpx.post(server.url + "/predict_tokens", json=body, headers=headers, timeout=120)


def shown_docs(browser) -> list[dict[str, Any]]:
    return browser.execute_script(READ_DOCS)


def text_of(browser, element_id: str) -> str:
    return browser.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def assert_entities_as_api(browser, texts: list[str], answer: list[list[dict]]) -> None:
    """Every text is shown whole and in order, each highlighted span is the API's item: its text (which is
    Python's text[start:end], in code points), start, end, label and score, and there are as many spans as items."""
    docs = shown_docs(browser)
    assert [doc["index"] for doc in docs] == list(range(len(texts)))
    for text, doc, items in zip(texts, docs, answer, strict=True):
        assert doc["text"] == text and doc["dir"] == "auto"
        assert len(doc["spans"]) == len(items), (text, doc["spans"], items)
        for span, item in zip(doc["spans"], items, strict=True):
            ((label, score),) = item["results"].items()
            shown = (span["shown"], span["label"], span["start"], span["end"])
            assert shown == (item["token"], label, item["start"], item["end"])
            assert span["shown"] == text[item["start"] : item["end"]]
            assert span["beside"] == json.dumps(label)  # the label is drawn beside the span (CSS content)
            assert span["score"] == pytest.approx(score, abs=1e-6) and label in span["title"]


def assert_json_and_curl(browser, server, texts: list[str], strategy: str, answer: list[list[dict]]) -> None:
    """The collapsible JSON is the API's answer, and the curl line sends the same request to the same server."""
    shown = json.loads(text_of(browser, "json"))
    assert len(shown) == len(answer)
    for page_items, api_items in zip(shown, answer, strict=True):
        assert [{**i, "results": None} for i in page_items] == [{**i, "results": None} for i in api_items]
        assert [i["results"] for i in page_items] == [pytest.approx(i["results"], abs=1e-6) for i in api_items]
    words = shlex.split(text_of(browser, "curl"))
    assert words[:5] == ["curl", "-s", "-X", "POST", server.url + "/predict_tokens"]
    assert words[5:7] == ["-H", "Content-Type: application/json"] and words[-2] == "-d"
    assert json.loads(words[-1]) == {"inputs": texts, "aggregation_strategy": strategy}


def test_page_is_public_self_contained_and_locked_down(server) -> None:
    """/ redirects to /ui; the page is HTML whose CSP forbids other hosts, and it names no other host."""
    root = httpx.get(server.url + "/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/ui"
    response = httpx.get(server.url + "/ui")
    assert response.status_code == 200 and response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    assert "http" not in policy and response.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"""(src|href|action)\s*=\s*["']?(https?:)?//""", response.text)
    assert "/ui" not in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_legend_and_model_line_come_from_info(page, server) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    info = httpx.get(server.url + "/info").json()
    legend = [li.text for li in page.find_elements(By.CSS_SELECTOR, "#legend li")]
    groups = list(dict.fromkeys(label.removeprefix("B-").removeprefix("I-") for label in info["labels"]))
    assert legend == [name for name in groups if name != "O"]
    model_line = text_of(page, "model")
    assert info["model_id"] in model_line and f"engine {info['engine']}" in model_line
    assert f"precision {info['precision']}" in model_line
    Select(page.find_element(By.ID, "strategy")).select_by_value("none")
    assert [li.text for li in page.find_elements(By.CSS_SELECTOR, "#legend li")] == info["labels"]


@pytest.mark.parametrize("strategy", ["max", "simple", "first", "average"])
def test_grouped_strategies_show_the_api_entities(page, server, strategy) -> None:
    """The seed sentence, CJK, emoji before the entities and mixed Arabic/Hebrew/Latin, one text per line."""
    texts = [SEED, CJK, EMOJI, RTL]
    answer = ask_api(server, texts, strategy).json()
    submit(page, texts, strategy)
    assert_entities_as_api(page, texts, answer)
    assert_json_and_curl(page, server, texts, strategy, answer)
    assert sum(map(len, answer)) > 0  # the comparison above is not over empty lists
    assert float(page.find_element("id", "timing").get_attribute("data-server-ms")) >= 0
    assert "ms in the browser" in text_of(page, "timing") and not page.find_element("id", "error").is_displayed()


def test_long_text_is_read_in_windows_and_shown_in_place(page, server) -> None:
    answer = ask_api(server, [LONG], "simple").json()
    truncated = httpx.post(
        server.url + "/predict_tokens", json={"inputs": [LONG], "aggregation_strategy": "simple", "truncate": True}
    ).json()
    assert len(answer[0]) > 2 * len(truncated[0])  # the page's request really went past one window
    submit(page, [LONG], "simple")
    assert_entities_as_api(page, [LONG], answer)


def test_whole_box_as_one_text_keeps_its_newlines(page, server) -> None:
    text = f"{EMOJI}\n\n{SEED}"
    answer = ask_api(server, [text], "max").json()
    submit(page, [text], "max", per_line=False)
    assert_entities_as_api(page, [text], answer)


def test_none_shows_every_token_with_its_top_label(page, server) -> None:
    texts = [SEED, EMOJI]
    answer = ask_api(server, texts, "none").json()
    submit(page, texts, "none")
    docs = shown_docs(page)
    for text, doc, items in zip(texts, docs, answer, strict=True):
        assert len(doc["spans"]) == len(items) and items[0]["token"] == doc["spans"][0]["shown"]
        for span, item in zip(doc["spans"], items, strict=True):
            ((label, score),) = item["results"].items()
            special = item["start"] == item["end"]
            assert span["shown"] == (item["token"] if special else text[item["start"] : item["end"]])
            assert (span["label"], span["start"], span["end"]) == (label, item["start"], item["end"])
            assert span["beside"] == json.dumps(label)
            assert span["score"] == pytest.approx(score, abs=1e-6)
    assert_json_and_curl(page, server, texts, "none", answer)


@pytest.mark.parametrize(
    "texts,status",
    [([f"text {i}" for i in range(MAX_TEXTS + 1)], 413), ([], 422)],
    ids=["too-many-texts", "no-text"],
)
def test_errors_show_the_api_message(page, server, texts, status) -> None:
    from selenium.webdriver.common.by import By

    refusal = ask_api(server, texts, "simple")
    assert refusal.status_code == status
    submit(page, texts, "simple")
    error = page.find_element(By.ID, "error")
    assert error.is_displayed() and error.get_attribute("data-status") == str(status)
    body = refusal.json()
    assert error.text == f"HTTP {status} {body['error_type']}: {body['error']}"
    assert page.find_element(By.ID, "result").get_attribute("data-state") == "error"
    assert not page.find_elements(By.CSS_SELECTOR, "#docs .doc")


def test_page_loads_nothing_from_elsewhere_and_logs_no_error(page, server) -> None:
    page.get_log("browser")  # drops what earlier tests logged (their 413 and 422 are logged as failed loads)
    open_page(page, server.url)
    submit(page, [SEED], "max")
    resources = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(name.startswith(server.url + "/") for name in resources)
    assert [entry for entry in page.get_log("browser") if entry["level"] == "SEVERE"] == []


def test_api_key_is_asked_for_and_kept_in_the_page(browser, checkpoint) -> None:
    """On a server with an API key: the page itself is public, /info's 401 shows the key field, a request
    without the key shows the API's 401, and with the key typed the page works; the key goes nowhere else."""
    from selenium.webdriver.common.by import By

    process = ServerProcess({"CHECKPOINT": str(checkpoint), "ENGINE": "onnxruntime", "API_KEY": KEY})
    try:
        process.wait_ready()
        assert httpx.get(process.url + "/ui").status_code == 200
        open_page(browser, process.url, ready="#key-row:not([hidden])")
        assert text_of(browser, "model").startswith("/info: HTTP 401 Unauthorized: ")
        submit(browser, [SEED], "max")
        refusal = httpx.post(process.url + "/predict_tokens", json={"inputs": [SEED]}).json()
        assert browser.find_element(By.ID, "error").text == f"HTTP 401 Unauthorized: {refusal['error']}"
        browser.find_element(By.ID, "key").send_keys(KEY)
        submit(browser, [SEED], "max")
        answer = ask_api(process, [SEED], "max", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert_entities_as_api(browser, [SEED], answer)
        assert browser.find_elements(By.CSS_SELECTOR, "#legend li")  # /info answered once the key was there
        curl = text_of(browser, "curl")
        assert "Authorization: Bearer <your API key>" in curl and KEY not in curl
        stored = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
        assert stored == [0, 0, ""]
    finally:
        assert process.stop(), process.output()


def test_screenshot(page, tmp_path) -> None:
    """The README's picture: the seed sentence and two more on the shared checkpoint (strategy simple).
    Written to docs/ui.png by `make screenshot` (UPDATE_SCREENSHOT=1, on the real checkpoint), so that a
    test run leaves the working tree as it found it; otherwise under the test's temporary folder."""
    submit(page, [SEED, "Angela Merkel visited Paris with Emmanuel Macron and met Siemens in Berlin."], "simple")
    update = os.environ.get("UPDATE_SCREENSHOT") == "1" and REAL_CHECKPOINT.is_dir()
    target = ROOT / "docs" / "ui.png" if update else tmp_path / "ui.png"
    assert page.save_screenshot(str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
