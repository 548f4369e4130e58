"""The README's picture of ldm-serve's page: the default model, four images of one prompt.

    python scripts/serve_screenshot.py [--out docs/images/serve.png]

Starts `ldm-serve` on a free port, opens its page in headless Debian chromium (selenium), asks for
four images of the README's first prompt with seed 0, and saves a screenshot once they are shown.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "serve.png"))
    args = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_serve import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ldm.cli.serve", "--port", str(port)])
    options = Options()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,720"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        for _ in range(600):
            try:
                driver.get(f"http://127.0.0.1:{port}/")
                break
            except Exception:  # noqa: BLE001 — not listening yet
                time.sleep(0.2)
        while not driver.find_elements("css selector", "#sampler option"):
            time.sleep(0.1)
        for field, value in (("seed", 0), ("count", 4)):
            element = driver.find_element("id", field)
            element.clear()
            element.send_keys(str(value))
        driver.find_element("id", "generate").click()
        while len(driver.find_elements("css selector", "#gallery img")) < 4:
            time.sleep(0.1)
        time.sleep(0.5)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
