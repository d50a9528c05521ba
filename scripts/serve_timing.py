"""Time `dpl serve` as a user meets it: from pressing Invert (DPL, 20 steps, the bundled model) to the
first edit shown, in headless Chromium; saves a screenshot of the page (docs/serve.png) and says how
much CPU time the browser took during the inversion (it shares the machine with the server).

The page is read once a second: every read runs script in the page, and reading it ten times a
second took the browser's CPU time (Chromium and its driver) during a 20-step inversion from about
6 s to 15 s, and the inversion from about 40 s to 62 s (this project's 2-core CPU, 2026-11-29).

    python scripts/serve_timing.py [--steps 20] [--screenshot docs/serve.png]
"""

from __future__ import annotations

import argparse
import glob
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def wait(condition, seconds=600):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(1.0)
    raise TimeoutError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--screenshot", default="docs/serve.png")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tempfile.mkdtemp()
    server = subprocess.Popen([sys.executable, "-m", "dpl_edit.cli", "serve", "--port", str(port), "--steps",
                               str(args.steps), "--cache", cache, "--device", "cpu"],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    wait(lambda: _up(url), 120)
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2100"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        browser.get(url)
        wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#picker input"))[0].click()
        wait(lambda: [o for o in browser.find_elements(By.CSS_SELECTOR, "li[role='option']")
                      if "test scene 0 (two objects)" in o.text])[0].click()
        prompt = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
        wait(lambda: "{" in prompt.get_attribute("value"))
        target = prompt.get_attribute("value").replace("{", "").replace("}", "").replace("circle", "triangle")
        browser.find_element(By.CSS_SELECTOR, "#targets textarea").send_keys(target)
        started, browser_cpu = time.perf_counter(), _chromium_cpu_seconds()
        browser.find_element(By.ID, "invert").click()
        wait(lambda: "reconstruction PSNR" in browser.find_element(By.ID, "status").text)
        inverted, browser_cpu = time.perf_counter(), _chromium_cpu_seconds() - browser_cpu
        wait(lambda: browser.find_element(By.ID, "edit").is_enabled())
        browser.find_element(By.ID, "edit").click()
        wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#edits img"))
        edited = time.perf_counter()
        browser.find_element(By.CSS_SELECTOR, "#targets textarea").send_keys("\n" + target.replace("sand", "grass"))
        browser.find_element(By.ID, "edit").click()  # two edits of the kept inversion, not inverted again
        wait(lambda: "2 edit(s) of the kept inversion" in browser.find_element(By.ID, "edit-status").text)
        second = time.perf_counter()
        print(f"Invert -> inversion shown: {inverted - started:.1f} s; -> first edit shown: {edited - started:.1f} s; "
              f"then two edits: {second - edited:.1f} s ({args.steps} steps, DPL); "
              f"Chromium's CPU time during the inversion: {browser_cpu:.1f} s")
        print(browser.find_element(By.ID, "status").text)
        for button in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']"):
            if button.text.strip() == "Attention":
                button.click()
        time.sleep(1)
        browser.save_screenshot(args.screenshot)
    finally:
        browser.quit()
        server.terminate()


def _chromium_cpu_seconds() -> float:
    """User + system CPU time of every Chromium and chromedriver process so far (/proc)."""
    ticks = 0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                name, fields = f.read().rsplit(")", 1)
        except OSError:  # the process ended
            continue
        if "chrom" in name.split("(", 1)[1]:
            ticks += int(fields.split()[11]) + int(fields.split()[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
