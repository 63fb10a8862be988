"""mipseg_annotate in a real headless browser: open the page, draw a stroke, save, check the PNG.

The browser is Debian's ``chromium`` driven by Playwright (``executable_path``; Playwright's own
browser download is not used). ``.ci/run`` installs it; with ``CI=true`` a browser that cannot
start fails the test instead of skipping it. ``MIPSEG_CHROMIUM`` points at another binary.
``MIPSEG_DOC_SCREENSHOT=documentation/images/annotate_page.png`` also writes the screenshot used
in documentation/annotate.md.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mipseg import paths
from mipseg.annotation_png import read_annotation

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token"


def unavailable(reason: str) -> None:
    """Fail in CI (the browser must work there), skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the browser test cannot run: {reason}")
    pytest.skip(reason)


def start_server(session):
    """Serve ``session`` on a free loopback port (uvicorn in a thread); returns (url, stop)."""
    import uvicorn

    from mipseg.annotate.annotate_api import bind_socket
    from mipseg.annotate.server import create_app

    sock = bind_socket("127.0.0.1", 0, explicit_port=True)
    config = uvicorn.Config(create_app(session, TOKEN), log_level="warning", access_log=False, lifespan="off")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def stop() -> None:
        uvicorn_server.should_exit = True
        thread.join(10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}/?token={TOKEN}", stop


@pytest.fixture
def server(data_roots):
    """A synthetic vessel dataset, one case not started yet."""
    from mipseg.annotate.annotate_api import open_session
    from mipseg.synthetic import synthesize_dataset

    synthesize_dataset(
        983, "vessels", num_cases=3, num_test_cases=0, shape=(40, 112, 112), show_progress=False
    )
    folder = paths.raw_dataset_dir(983)
    (folder / "annotationsTr" / "vessels_000_mip0.png").unlink()  # one case not started yet
    session = open_session(983, use_model=False)
    url, stop = start_server(session)
    yield url, folder, session
    stop()


@pytest.fixture
def browser_page(tmp_path: Path):
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as error:
        unavailable(f"the playwright package is not installed ({error}); pip install -e '.[test]'")
    executable = os.environ.get("MIPSEG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).is_file():
        unavailable(f"no chromium at {executable} (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=executable,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1400, "height": 820},
            )
        except Error as error:
            unavailable(f"{executable} did not start: {str(error).splitlines()[0]}")
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page, errors
        context.close()


def wait_for_status(page, text: str) -> str:
    page.wait_for_function(
        "text => document.getElementById('status').textContent.includes(text)", arg=text, timeout=30_000
    )
    return page.inner_text("#status")


def test_draw_a_stroke_save_and_find_the_png(server, browser_page, tmp_path: Path) -> None:
    url, folder, session = server
    page, errors = browser_page
    page.goto(url)
    page.wait_for_function("document.body.dataset.ready === '1'")
    assert page.inner_text("#dataset-name").startswith("Dataset983_SyntheticVessels")
    assert page.locator("#case-list li").count() == 3
    assert "vessels_000" in page.inner_text("#target-name")  # the first case, not started
    # a case never drawn starts from the threshold of its MIP (mip mode without model or label set)
    wait_for_status(page, "started from threshold (not saved yet)")
    painted = "window.mipseg.state.labels.reduce((a, b) => a + b, 0)"
    assert page.evaluate(painted) > 0
    page.select_option("#prefill-source", "empty")
    wait_for_status(page, "started from empty")
    assert page.evaluate(painted) == 0

    row, first, last = 30, 20, 80
    start = page.evaluate(f"window.mipseg.imageToScreen({row}, {first})")
    end = page.evaluate(f"window.mipseg.imageToScreen({row}, {last})")
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=25)
    page.mouse.up()
    assert page.evaluate(painted) == last - first + 1
    page.keyboard.press("Control+z")
    assert page.evaluate(painted) == 0
    page.keyboard.press("Control+y")
    assert page.evaluate(painted) == last - first + 1
    assert page.locator("#case-list li.current .badge.unsaved").count() == 1

    page.click("#save")
    assert "validated" in wait_for_status(page, "saved vessels_000_mip0.png")
    png = folder / "annotationsTr" / "vessels_000_mip0.png"
    drawing = read_annotation(png, session.store.spec)
    assert drawing.shape == (112, 112)
    expected = np.zeros_like(drawing)
    expected[row, first : last + 1] = 1
    np.testing.assert_array_equal(drawing, expected)
    assert page.locator("#case-list li .badge.valid").count() == 3

    # the next case has a (simulated) drawing: shown over its MIP, as in the documentation
    page.keyboard.press("n")
    wait_for_status(page, "saved drawing loaded")
    assert page.locator("#case-list li.current .badge.unsaved").count() == 0
    page.mouse.move(*page.evaluate("window.mipseg.imageToScreen(56, 56)"))
    time.sleep(0.2)
    screenshot = tmp_path / "annotate_page.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
    target = os.environ.get("MIPSEG_DOC_SCREENSHOT")
    if target:
        shutil.copyfile(screenshot, target)
    assert not errors, errors


def test_slice_mode_opens_the_suggested_slice_and_saves_another(data_roots, browser_page) -> None:
    from mipseg import io
    from mipseg.annotate.annotate_api import open_session
    from mipseg.synthetic import synthesize_dataset

    synthesize_dataset(984, "organs", num_cases=2, num_test_cases=0, shape=(16, 64, 64), show_progress=False)
    folder = paths.raw_dataset_dir(984)
    io.write_json(
        {"cases": {"organs_000": {"slice": 9, "axis": 0}}},
        paths.preprocessed_dataset_dir(984) / "suggested_slices.json",
    )
    session = open_session(984, use_model=False)
    url, stop = start_server(session)
    page, errors = browser_page
    try:
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready === '1'")
        assert page.evaluate("window.mipseg.state.target.index") == 9
        assert "suggested" in page.inner_text("#slice-label")
        page.keyboard.press("ArrowUp")
        page.wait_for_function(
            "window.mipseg.state.target.index === 10 && document.body.dataset.ready === '1'"
        )
        wait_for_status(page, "organs_000 slice 10")
        page.fill("#size", "5")
        page.dispatch_event("#size", "input")
        centre = page.evaluate("window.mipseg.imageToScreen(32, 32)")
        page.mouse.click(*centre)
        page.keyboard.press("Control+s")
        wait_for_status(page, "saved organs_000_slice10.png")
        drawing = read_annotation(folder / "annotationsTr" / "organs_000_slice10.png", session.store.spec)
        assert drawing[32, 32] == 1 and 9 <= drawing.sum() <= 25  # a 5-pixel disc
        assert len(list((folder / "annotationsTr").glob("organs_000_slice*.png"))) == 2
        assert not errors, errors
    finally:
        stop()
