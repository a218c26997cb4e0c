"""The operator web page, driven in a real headless Chromium against a real `bentoml serve`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from detector.anomaly_detector import AnomalyDetector
from detector.data.mvtec import MVTecCategory
from devtools.local_server import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    bentoml_serve,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


def test_upload_shows_score_verdict_and_overlay(
    store_copy: Callable[[Path], Path],
    synthetic_dataset: MVTecCategory,
    fitted_detector: AnomalyDetector,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import sync_playwright

    home = store_copy(tmp_path / "bentoml_home")
    defect = next(s.path for s in synthetic_dataset.test_samples() if s.defect_type == "color")
    (expected,) = fitted_detector.predict([defect], with_maps=False)

    with bentoml_serve(home, tmp_path / "serve.log") as url, sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page()
            page.goto(f"{url}/ui/#inspect")
            # The random-weight backbone is said before anything is inspected.
            wait_for(
                page,
                "document.getElementById('warning').textContent.includes('random-weight')",
                timeout=30,
            )
            page.set_input_files("#file", str(defect))
            wait_for(page, "document.getElementById('overlay').naturalWidth > 0", timeout=60)
            wait_for(
                page,
                "document.getElementById('drift').textContent.includes('(1 so far)')",
                timeout=30,
            )
            drift = page.inner_text("#drift")
            verdict = page.inner_text("#verdict")
            score = float(page.inner_text("#d-score"))
            overlay_width = page.eval_on_selector("#overlay", "img => img.naturalWidth")
            page.screenshot(path=str(tmp_path / "page.png"))
            # A phone photo stored sideways (EXIF orientation 6): the browser shows it upright,
            # and the overlay must come back the same way round.
            page.evaluate("document.getElementById('overlay').removeAttribute('src')")
            page.set_input_files("#file", str(sideways_jpeg(tmp_path)))
            wait_for(page, "document.getElementById('overlay').naturalWidth > 0", timeout=60)
            sizes = page.evaluate(
                "['original', 'overlay'].map(id => { const i = document.getElementById(id);"
                " return [i.naturalWidth, i.naturalHeight]; })"
            )
        finally:
            browser.close()
    assert verdict == ("ANOMALOUS" if expected.is_anomalous else "Normal")
    assert score == pytest.approx(expected.score, abs=1e-4)
    assert overlay_width == expected.image_size[0]
    # One upload is scored once (the verdict rides on the heatmap response) and enters the
    # drift window, which needs 20 images before it gives a statistic.
    assert drift == "Line drift: waiting for 20 images (1 so far)"
    assert sizes == [[48, 96], [48, 96]]  # stored 96 x 48, shown upright by both


def sideways_jpeg(folder: Path) -> Path:
    from PIL import Image

    path = folder / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (96, 48), (150, 110, 80)).save(path, "JPEG", exif=exif.tobytes())
    return path
