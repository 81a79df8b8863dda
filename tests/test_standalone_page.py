"""Issue #11: the web page at ``/``, driven in a real browser (Debian's chromium, headless, over WebDriver) from the
sign-in form to a generated image, on the tiny model. Skipped, with the reason, where chromium is not installed."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standalone_helpers import ALICE, USERS, Client, basic, load_service
from webdriver import Browser, find_chromium

from backend.config import Settings
from backend.standalone.http_api import BASE
from backend.standalone.server import StandaloneServer

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium and chromedriver installed (Debian: apt-get "
                                                          "install chromium chromium-driver; .ci/run installs them)")


@pytest.fixture
def server(tmp_path: Path, onnx_bundle: Path) -> Iterator[StandaloneServer]:
    settings = Settings().updated(data_dir=tmp_path / "data", users=USERS, port=0, threads=1)
    srv = StandaloneServer(settings, services=[load_service(onnx_bundle)])
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None
    b = Browser(*CHROMIUM)
    yield b
    b.close()


def test_a_task_from_the_form_to_a_downloadable_image(server: StandaloneServer, browser: Browser) -> None:
    started = time.monotonic()
    page = server.url.split(BASE)[0] + "/"
    browser.open(page)
    assert browser.wait("return document.querySelector('#availability').textContent.includes('ready')")

    # A wrong secret is refused with the API's own message, and the form stays.
    browser.type("#user", ALICE[0])
    browser.type("#secret", "not-the-secret-at-all")
    browser.click("#signin-form button")
    refused = browser.wait("const e = document.querySelector('#signin-error'); return e && e.textContent")
    assert refused.startswith("401") and "authentication required" in refused
    assert browser.run("return document.querySelector('#app').hidden") is True

    browser.type("#secret", ALICE[1])
    browser.click("#signin-form button")
    browser.wait("return !document.querySelector('#app').hidden")

    # An input the API refuses: its message is shown as it is.
    browser.type("#prompt", "   ")
    browser.click("#submit")
    shown = browser.wait("const e = document.querySelector('#error'); return !e.hidden && e.textContent")
    assert shown == "400: the prompt is empty; describe the image you want"

    browser.type("#prompt", "a red fox in the snow")
    browser.type("#negative_prompt", "blurry")
    browser.select("#size", "384x384")
    browser.type("#steps", "12")
    browser.type("#seed", "42")
    browser.select("#scheduler", "euler")
    browser.type("#numberOfImages", "2")
    browser.click("#submit")
    # Progress is shown as it comes: record the bar until the task is done.
    seen: list[float] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = browser.run("const t = document.querySelector('#tasks .task');"
                            "return t && [t.dataset.status, t.querySelector('progress').value,"
                            " t.querySelectorAll('.images img').length];")
        if state:
            seen.append(float(state[1]))
            if state[0] == "done" and state[2] == 2:
                break
        time.sleep(0.02)
    else:
        raise AssertionError(f"the images never showed; progress seen: {seen}")
    assert seen == sorted(seen), seen
    assert any(0 < p < 1 for p in seen), f"no progress between start and end was shown: {seen}"
    assert browser.wait("return document.querySelector('#error').hidden")

    sizes = browser.wait("const imgs = [...document.querySelectorAll('#tasks .task img')];"
                         "return imgs.every(i => i.complete && i.naturalWidth) && "
                         "imgs.map(i => [i.naturalWidth, i.naturalHeight]);")
    assert sizes == [[384, 384], [384, 384]]
    links = browser.run("return [...document.querySelectorAll('#tasks a.download')].map(a => [a.download, a.href]);")
    task_id = int(links[0][0].split("-")[1])
    assert [name for name, _ in links] == [f"text2image-{task_id}-0.png", f"text2image-{task_id}-1.png"]
    assert all(href.startswith("blob:") for _, href in links)
    # What the download link gives is the PNG the API serves.
    downloaded = browser.run_async(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {"
        "  let s = ''; new Uint8Array(b).forEach(x => { s += String.fromCharCode(x); }); done(btoa(s));"
        "}).catch(e => done('failed: ' + e));",
        links[0][1])
    api = Client(server.url, basic(*ALICE))
    assert base64.b64decode(downloaded) == api.get(f"task/{task_id}/image/0").body
    task: dict[str, Any] = api.get(f"task/{task_id}").data["task"]
    assert task["options"] == {"negative_prompt": "blurry", "size": "384x384", "steps": 12, "seed": 42,
                               "scheduler": "euler"}

    # Delete: gone from the page and from the API.
    browser.click("#tasks .task .delete")
    browser.wait("return document.querySelectorAll('#tasks .task').length === 0")
    assert api.get(f"task/{task_id}").status == 404
    print(f"\nbrowser test: chromium {browser.version}, {time.monotonic() - started:.1f} s, "
          f"{len(seen)} progress readings")
