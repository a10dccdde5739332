"""Headless Chromium for end-to-end tests: Debian's ``chromium`` and ``chromium-driver``
(``make install`` brings them), driven with Selenium. No network but the loopback.

    with Browser(artifacts) as browser:
        browser.open("http://127.0.0.1:8501")
        browser.wait_for_text("Sign in")
        browser.screenshot("sign-in")
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement

WAIT_SECONDS = 30
WINDOW = (1440, 1000)
ARTIFACTS_ENV = "MEMWARDEN_TEST_ARTIFACTS"


def artifacts_dir(default: Path) -> Path:
    """Where screenshots go: ``$MEMWARDEN_TEST_ARTIFACTS`` or ``default`` (git-ignored)."""
    folder = Path(os.environ.get(ARTIFACTS_ENV) or default)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def chromium_problem() -> str | None:
    """Why no browser can run here, or None."""
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return f"{program} is not installed (make install brings Debian's chromium)"
    return None


class Browser:
    def __init__(self, artifacts: Path) -> None:
        self.artifacts = artifacts
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-background-networking",
                     "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                     "--disable-extensions", "--disable-sync", "--metrics-recording-only",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}"):
            options.add_argument(flag)
        service = Service(executable_path=shutil.which("chromedriver") or "chromedriver")
        self.driver = webdriver.Chrome(options=options, service=service)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.driver.quit()

    def open(self, url: str) -> None:
        self.driver.get(url)

    def until(self, what: str, found: Callable[[], Any], seconds: float = WAIT_SECONDS) -> Any:
        """Poll ``found`` until it returns something truthy; fail with ``what`` and a screenshot."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                result = found()
            except (StaleElementReferenceException, WebDriverException):
                result = None  # the page re-rendered under us: look again
            if result:
                return result
            if time.monotonic() > deadline:
                shot = self.screenshot(f"failed-{_slug(what)}", settle=False)
                raise AssertionError(f"gave up waiting for {what}; screenshot: {shot}\n"
                                     f"page text:\n{self.text()[:3000]}")
            time.sleep(0.2)

    def text(self) -> str:
        try:
            return str(self.driver.find_element(By.TAG_NAME, "body").text)
        except WebDriverException:
            return ""

    def wait_for_text(self, text: str, seconds: float = WAIT_SECONDS) -> None:
        self.until(f"text {text!r}", lambda: text in self.text(), seconds)

    def idle(self, seconds: float = WAIT_SECONDS) -> None:
        """Wait until Streamlit has finished running the script (no spinner, no stale view)."""
        def settled() -> bool:
            running = self.driver.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']")
            stale = self.driver.find_elements(By.CSS_SELECTOR, "[data-stale='true']")
            return not running and not stale

        time.sleep(0.3)
        self.until("the page to finish running", settled, seconds)

    def element(self, css: str, containing: str | None = None) -> WebElement:
        def find() -> WebElement | None:
            for candidate in self.driver.find_elements(By.CSS_SELECTOR, css):
                if candidate.is_displayed() and (containing is None
                                                 or containing in candidate.text):
                    return candidate
            return None

        return self.until(f"{css} containing {containing!r}", find)

    def click_button(self, label: str, seconds: float = WAIT_SECONDS) -> None:
        self.element("button", label).click()
        self.idle(seconds)

    def fill(self, label: str, value: str, *, submit: bool = False) -> None:
        """Type into the text input or area whose label is ``label``."""
        def find() -> WebElement | None:
            for box in self.driver.find_elements(
                    By.CSS_SELECTOR, "[data-testid='stTextInput'], [data-testid='stTextArea']"):
                if box.is_displayed() and box.text.splitlines()[:1] == [label]:
                    return box.find_element(By.CSS_SELECTOR, "input, textarea")
            return None

        field = self.until(f"input {label!r}", find)
        field.clear()
        field.send_keys(value)

    def _select_box(self, label: str) -> WebElement:
        def find() -> WebElement | None:
            for box in self.driver.find_elements(By.CSS_SELECTOR,
                                                 "[data-testid='stSelectbox']"):
                if box.is_displayed() and box.text.splitlines()[:1] == [label]:
                    return box
            return None

        return self.until(f"select box {label!r}", find)

    def choose(self, label: str, option: str) -> None:
        """Pick the option containing ``option`` in the select box labelled ``label``."""
        self._select_box(label).find_element(By.CSS_SELECTOR, "input").click()
        self.element("[role='option']", option).click()
        self.idle()

    def options(self, label: str) -> list[str]:
        """The options the select box labelled ``label`` offers."""
        field = self._select_box(label).find_element(By.CSS_SELECTOR, "input")
        field.click()
        self.element("[role='option']")
        found = [o.text for o in self.driver.find_elements(By.CSS_SELECTOR, "[role='option']")]
        field.send_keys(Keys.ESCAPE)
        return found

    def click_tab(self, title: str) -> None:
        self.element("[role='tab']", title).click()
        self.idle()

    def click_link(self, text: str) -> None:
        self.element("a", text).click()
        self.idle()

    def screenshot(self, name: str, *, settle: bool = True) -> Path:
        """The whole page, once Streamlit has finished running (unless ``settle`` is off)."""
        if settle:
            self.idle(WAIT_SECONDS * 4)
        path = self.artifacts / f"{name}.png"
        # The whole page, not only the window: set the window as tall as the content.
        height = self.driver.execute_script(
            "const main = document.querySelector('[data-testid=\"stMain\"]') || document.body;"
            "return Math.max(main.scrollHeight, document.body.scrollHeight);")
        self.driver.set_window_size(WINDOW[0], max(WINDOW[1], min(int(height) + 80, 6000)))
        time.sleep(0.3)
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(*WINDOW)
        return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60]
