"""Takes docs/img/dashboard.png: a live demo run's dashboard, in Debian's chromium driven by Playwright.

    ERC_DATA__DIR=../shared/data .venv/bin/python docs/img/dashboard_screenshot.py

It runs ``erc-stream demo --keep-dashboard`` (the hf backend, the shipped adapter), waits until the replay is
over, opens the printed URL, picks the riskiest conversation and saves the page.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

OUT = Path(__file__).resolve().parent / "dashboard.png"


def main() -> int:
    demo = subprocess.Popen([sys.executable, "-m", "erc_stream", "demo", "--keep-dashboard", "--dialogues", "4",
                             "--rate", "4"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, done = None, False
    assert demo.stdout is not None
    for line in demo.stdout:
        print(line, end="")
        if m := re.search(r"live dashboard: (http://\S+)", line):
            url = m.group(1)
        if "the dashboard stays up" in line:
            done = True
            break
    if not (url and done):
        demo.kill()
        return 1
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(url)
        page.wait_for_selector("tr.conv")
        alert = page.locator(".alert a").first
        (alert if alert.count() else page.locator("tr.conv").first).click()
        page.wait_for_selector("#timeline .turn")
        time.sleep(1.5)
        page.screenshot(path=str(OUT))
        browser.close()
    demo.send_signal(signal.SIGINT)
    demo.wait(30)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
