"""The Space as a new user meets it: `python spaces/app.py --model DIR` in its own process, driven in headless
Chromium (Debian's ``/usr/bin/chromium``) with Python `playwright` — load the page, upload an image, segment it,
wait for the annotated result, check the legend and the attention heads, do the same with an example scene, and
take a screenshot.

Needs ``pip install playwright`` and ``apt-get install chromium`` (never ``playwright install``); skipped without
them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path(os.environ.get("HF_USEG_CHROMIUM", "/usr/bin/chromium"))
REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "training" / "configs" / "stego_tiny.yaml"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Python playwright is not installed (pip install playwright; no browser download)"
)
pytest.importorskip("gradio", reason="the Space needs gradio (pip install hf-useg[gradio])")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from hf_useg.training import load_training_arguments, train

    output_dir = tmp_path_factory.mktemp("stego-tiny")
    args = load_training_arguments(
        TINY_CONFIG, output_dir=str(output_dir), max_steps=2, val_every=100, save_every=100, synthetic_num_images=8
    )
    return Path(train(args)["model_dir"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(model_dir, tmp_path_factory):
    """The app started the documented way, in its own process; its log is shown if it fails to come up."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "spaces" / "app.py"), "--model", str(model_dir), "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app did not start (exit code {process.poll()}):\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _expected_legend(model_dir: Path, path: Path) -> list[str]:
    """Segment names of the model's own `predict` on the image (flip TTA, no CRF), largest segment first."""
    from transformers import AutoModel

    from hf_useg.image_processing import UnsupervisedSegmentationImageProcessor

    model = AutoModel.from_pretrained(model_dir).eval()
    processor = UnsupervisedSegmentationImageProcessor.from_pretrained(model_dir)
    image = Image.open(path).convert("RGB")
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    log_probs = model.predict(pixel_values, output_size=(image.height, image.width), flip_tta=True).cluster_log_probs
    ids, counts = np.unique(log_probs.argmax(1)[0].numpy(), return_counts=True)
    return [model.config.id2label[int(i)] for i in ids[np.argsort(-counts, kind="stable")]]


def _segment_and_read_legend(page, expected_size: str) -> list[str]:
    page.click("#segment-button")
    page.wait_for_function(
        "size => document.querySelector('#info') && document.querySelector('#info').innerText.includes(size)",
        arg=expected_size,
        timeout=90_000,
    )
    legend = page.locator("#result .legend .legend-item")
    legend.first.wait_for(state="visible", timeout=30_000)
    return [text.strip() for text in legend.all_inner_texts()]


def test_space_in_headless_chromium(model_dir, app_url, tmp_path):
    from hf_useg.data import make_synthetic_scenes

    upload = tmp_path / "my_scene.png"
    make_synthetic_scenes(1, (90, 150), num_classes=3, seed=5)[0]["image"].save(upload)
    expected = _expected_legend(model_dir, upload)
    assert expected, "the reference segmentation is empty"

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1100},
        )
        try:
            page = browser.new_page()
            page.goto(app_url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_selector("#segment-button", timeout=120_000)
            assert "hf_useg" in page.title()
            assert page.locator("#model input").input_value() == str(model_dir)

            # 1. upload an image of one's own
            page.set_input_files("#input-image input[type=file]", str(upload))
            page.locator("#input-image img").first.wait_for(state="visible", timeout=30_000)
            legend = _segment_and_read_legend(page, "150×90 px")
            assert legend == expected
            info = page.locator("#info").inner_text()
            assert "STEGO" in info and "cluster probe" in info and "flip TTA on" in info
            # the base image and one mask per legend entry, and one attention map per head
            assert page.locator("#result img.mask").count() == len(expected)
            page.locator("#attention img").first.wait_for(state="visible", timeout=30_000)
            assert page.locator("#attention img").count() == 2
            page.screenshot(path=str(tmp_path / "space_upload.png"), full_page=True)

            # 2. an example scene (the first example button), with the dense CRF when it is available
            page.locator("button.gallery-item").first.click()
            crf = importlib.util.find_spec("pydensecrf") is not None
            if crf:
                page.get_by_label("Dense CRF").check()
            legend = _segment_and_read_legend(page, "144×96 px")
            assert legend and all(label.startswith("synthetic-class-") for label in legend)
            assert ("CRF on" if crf else "CRF off") in page.locator("#info").inner_text()
            screenshot = tmp_path / "space_example.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    shot = Image.open(screenshot)
    assert shot.width == 1280 and shot.height >= 1100
    keep = os.environ.get("HF_USEG_SCREENSHOT_DIR")
    if keep:  # to look at the page by eye
        Path(keep).mkdir(parents=True, exist_ok=True)
        for name in ("space_upload.png", "space_example.png"):
            shutil.copy(tmp_path / name, Path(keep) / name)
