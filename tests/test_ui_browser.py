"""The web app end to end in a real headless browser (issue 10): Debian's Chromium, via Selenium.

`dpl ui` runs as a user starts it (a subprocess, the bundled model, a free port); the test picks
a bundled scene, inverts with NTI and DPL (2 steps), watches the progress bar, edits, checks
that the pictures and numbers appear, gives a bad prompt and checks that the page shows the
CLI's line and keeps working. `make test` installs Chromium first (`make browser`); without it the test is skipped.
The screenshot goes to the test's folder, and to $DPL_UI_SCREENSHOT when set (the README's
`docs/ui.png` is made that way).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="Chromium is not installed (`make browser` installs it; `make test` does)",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`dpl ui` on a free port; the address it prints."""
    log = tmp_path_factory.mktemp("ui") / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "dpl_edit.cli", "ui", "--port", str(_free_port())],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield _wait(lambda: _printed_address(log), 120, f"no address printed: {log}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def _printed_address(log: Path) -> str | None:
    for line in log.read_text().splitlines():
        if line.startswith("dpl ui: http://127.0.0.1:"):
            return line.removeprefix("dpl ui: ")
    return None


def _wait(check: Callable[[], object], seconds: float, what: str) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {seconds} s: {what}")


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1400,2600"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _text(driver: webdriver.Chrome, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def _value(driver: webdriver.Chrome, element_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#{element_id} textarea").get_attribute("value")


def _type(driver: webdriver.Chrome, selector: str, text: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE, text, Keys.TAB)


def _images(driver: webdriver.Chrome, element_id: str) -> int:
    found = driver.find_elements(By.CSS_SELECTOR, f"#{element_id} img")
    return len([image for image in found if image.get_attribute("src")])


def test_the_whole_flow_in_a_browser(address: str, browser: webdriver.Chrome, tmp_path: Path):
    start = time.monotonic()
    browser.get(address)
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#scenes button.thumbnail-item"), 30,
          "the gallery of bundled scenes")  # fmt: skip
    browser.find_elements(By.CSS_SELECTOR, "#scenes button.thumbnail-item")[0].click()
    _wait(lambda: _value(browser, "prompt") and _value(browser, "target"), 10, "the captions")
    caption = _value(browser, "prompt")
    words = _wait(lambda: _value(browser, "words"), 60, "the object words (model loading)")
    assert set(str(words).split()) <= set(caption.split())  # the caption's object words
    _type(browser, "#steps input", "2")
    next(
        o for o in browser.find_elements(By.CSS_SELECTOR, "#method label") if o.text == "both"
    ).click()

    browser.find_element(By.ID, "invert").click()
    seen = set()  # the stages the progress bar names while the inversion runs

    def inverted() -> bool:
        page = browser.find_element(By.TAG_NAME, "body").text
        stages = ("DDIM inversion", "token learning + null-text inversion")
        seen.update(stage for stage in stages if stage in page)
        return "inverted in" in _text(browser, "status")

    _wait(inverted, 240, f"the inversion ({_text(browser, 'status')!r})")
    assert seen, "no progress bar was shown"
    assert _images(browser, "attention") == 1 and _images(browser, "reconstruction") == 2
    scores = _text(browser, "scores")
    assert "PSNR: NTI" in scores and ", DPL" in scores and "leakage" in scores
    assert "%" in scores  # each masked word's share outside its object

    browser.find_element(By.ID, "edit").click()
    _wait(lambda: "edited in" in _text(browser, "status"), 60, "the edit")
    assert _images(browser, "edits") == 6  # source, edit, difference; NTI's, then DPL's
    commands = _value(browser, "command").splitlines()
    assert [c.split(" --method ")[1].split()[0] for c in commands] == ["nti", "dpl"]
    assert commands[0].startswith("dpl run source.png --prompt ")
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(tmp_path / "ui.png"))
    if os.environ.get("DPL_UI_SCREENSHOT"):
        shutil.copy(tmp_path / "ui.png", os.environ["DPL_UI_SCREENSHOT"])

    _type(browser, "#prompt textarea", "a purple dog")
    browser.find_element(By.ID, "invert").click()
    _wait(lambda: "error:" in _text(browser, "status"), 30, "the error line")
    assert _text(browser, "status").startswith("error: the word 'dog' in 'a purple dog' is not")
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text

    browser.find_element(By.ID, "edit").click()  # the cached inversion still edits
    _wait(lambda: "edited in" in _text(browser, "status"), 60, "the edit after the error")
    print(f"browser flow: {time.monotonic() - start:.0f} s")
