"""Headless Chromium for the page's tests and its screenshot (docs/live.png).

`python -m tools.browser URL -o shot.png [--width W] [--height H] [--wait-until JS] [--timeout S]`

Selenium drives the system's Chromium through the system's chromedriver (Debian: `apt-get
install chromium chromium-driver`; the two come from one source package, so their versions
always match, and nothing is downloaded: selenium's own driver manager never runs when the
driver's path is given). `browser()` says why it cannot start (no selenium, no chromium,
no driver) with `BrowserUnavailable`; the tests skip with that reason. The command waits
until the JavaScript expression `--wait-until` is true (bounded by --timeout), fails if the
page logged errors to its console, and saves a screenshot. Exit status: 0 written, 1 the
page failed (timeout or console errors), 2 bad input or no browser.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)


class BrowserUnavailable(Exception):
    """Why no headless browser can be had here (one line)."""


def _which(names: tuple[str, ...]) -> str | None:
    for n in names:
        path = shutil.which(n) or (f"/usr/lib/chromium/{n}" if Path(f"/usr/lib/chromium/{n}").is_file() else None)
        if path:
            return path
    return None


def browser(width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium (selenium WebDriver) that keeps its console log."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserUnavailable("selenium is not installed (pip install -e '.[browser]')") from None
    binary, driver = _which(CHROMIUM), _which(DRIVER)
    if binary is None:
        raise BrowserUnavailable("no chromium on PATH (Debian: apt-get install chromium chromium-driver)")
    if driver is None:
        raise BrowserUnavailable("no chromedriver on PATH (Debian: apt-get install chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-extensions", "--no-first-run", "--hide-scrollbars",
              f"--window-size={width},{height}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    except WebDriverException as e:
        raise BrowserUnavailable(f"chromium did not start: {str(e.msg or e).splitlines()[0]}") from None


def console_errors(driver: Any) -> list[str]:
    """The console's errors since the last call (uncaught exceptions included)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def wait_for(driver: Any, script: str, timeout_s: float, poll_s: float = 0.1) -> Any:
    """Poll `return (script)` until truthy; its value, or TimeoutError after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while True:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"waited {timeout_s:g} s for {script}")
        time.sleep(poll_s)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.browser",
                                description="Screenshot a page in headless Chromium.")
    p.add_argument("url")
    p.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--wait-until", default="document.readyState === 'complete'",
                   help="JavaScript expression to wait for before the screenshot")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait at most (default 60)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        driver = browser(args.width, args.height)
    except BrowserUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from selenium.common.exceptions import WebDriverException

    try:
        try:
            driver.get(args.url)
            wait_for(driver, args.wait_until, args.timeout)
        except (TimeoutError, WebDriverException) as e:
            print(f"error: {args.url}: {str(getattr(e, 'msg', None) or e).splitlines()[0]}", file=sys.stderr)
            return 1
        errors = console_errors(driver)
        if errors:
            print(f"error: the page logged {len(errors)} console error(s): {errors[0]}", file=sys.stderr)
            return 1
        args.output.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.output))
    finally:
        driver.quit()
    print(f"{args.url} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
