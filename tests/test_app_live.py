"""The launched app: its HTTP API driven with gradio_client, and the page driven in headless Chromium (Playwright).

The browser test needs Debian's ``chromium`` (``make system-deps``) and the ``playwright`` package (dev extra); it
skips without them unless ``LOL_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from collection import SHIPPED, ZOOS
from conftest import make_collection

pytest.importorskip("gradio")

from gradio_client import Client, handle_file

from app.ui import build_demo
from app.uploads import UploadLedger
from app.web import launch_options
from lol_engine.explorer import Explorer

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("LOL_CHROMIUM", "/usr/bin/chromium")
DIGITS = sorted((ZOOS / "digits" / "loras").iterdir())
FASHION = sorted((ZOOS / "fashion-gen" / "loras").iterdir())
CAP = 5 * 2**20  # this app's upload cap


@pytest.fixture(scope="module")
def gradio_temp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This module's own Gradio temp folder (``GRADIO_TEMP_DIR``), so that what uploads leave there can be seen."""
    folder = tmp_path_factory.mktemp("gradio-temp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(folder))
        yield folder


def left_in(folder: Path) -> list[str]:
    """Files with content under ``folder`` (Gradio's gr.File leaves a 0-byte ``tmp*`` stub at every event)."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p.stat().st_size)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Explorer]:
    """This module's own collection: its tests add LoRAs."""
    explorer = make_collection(tmp_path_factory.mktemp("live"))
    yield explorer
    explorer.close()


@pytest.fixture(scope="module")
def app_url(live: Explorer, gradio_temp: Path) -> Iterator[str]:
    ledger = UploadLedger()
    demo = build_demo(live, max_upload=CAP, ledger=ledger)
    demo.queue(default_concurrency_limit=8)
    demo.launch(
        server_name="127.0.0.1",
        server_port=None,
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        **launch_options(CAP, ledger),
    )
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(app_url: str) -> Iterator[Client]:
    c = Client(app_url, verbose=False)
    yield c
    c.close()


def test_api_lists_every_action(client: Client) -> None:
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    actions = {"/analyse", "/add", "/inspect", "/status", "/labels", "/train"}
    from app.api import ENDPOINTS

    data = {f"/{name}" for name in ENDPOINTS}
    assert actions | data <= set(endpoints) and "/predictors" in data
    for name in data:  # typed parameters and one JSON output, no component choices (no empty Literal[])
        described = endpoints[name]
        assert all("Literal" not in p["python_type"]["type"] for p in described["parameters"]), name
        assert len(described["returns"]) == 1 and described["returns"][0]["python_type"]["type"].startswith(
            ("dict", "list")
        ), name
    assert not any(name.startswith("/value_") or "lambda" in name for name in endpoints)


def test_api_upload_predict_and_neighbours(client: Client) -> None:
    files = [
        handle_file(str(FASHION[40] / "adapter_model.safetensors")),
        handle_file(str(FASHION[40] / "adapter_config.json")),
    ]
    card, predictions, spectrum, neighbours, modules, _, blocks = client.predict(files, "", api_name="/analyse")
    assert "fashion" in card and f"3 of {len(SHIPPED)} fit" in card
    rows = {row[0]: row for row in predictions["data"]}
    assert set(rows) == {"fashion-gen-bold", "fashion-gen-class", "fashion-gen-quality"}
    quality = dict(zip(predictions["headers"], rows["fashion-gen-quality"], strict=True))
    assert quality["what it predicts"] == "Generation quality (judge score)"
    assert quality["likely range (90 %)"].endswith(" %") and " – " in quality["likely range (90 %)"]
    first = dict(zip(neighbours["headers"], neighbours["data"][0], strict=True))
    assert len(neighbours["data"]) == 10 and first["by"] == "ΔW cosine" and first["relation"] == ""
    assert len(modules["data"]) == 3 and spectrum is not None and blocks is not None
    assert "AutoV2" in card
    stored = client.predict(first["id"], 10, "", api_name="/lora")
    assert stored["labels"] and len(stored["neighbours"]) == 10 and stored["neighbours"][0]["by"] == "ΔW cosine"
    data = client.predict(
        [handle_file(str(FASHION[40] / "adapter_model.safetensors"))], "", 10, api_name="/prediction"
    )
    assert {p["predictor"] for p in data["predictions"]} == set(rows) and data["base_family"] == "fashion-vae"
    assert [n["id"] for n in data["neighbours"]] == [r[-1] for r in neighbours["data"]]


def test_api_add_bad_input_and_status(client: Client, live: Explorer, tmp_path: Path) -> None:
    before = live.store.count()
    upload = tmp_path / "mine.safetensors"
    shutil.copyfile(DIGITS[200] / "adapter_model.safetensors", upload)
    message = client.predict([handle_file(str(upload))], "", api_name="/add")
    assert "Added **mine**" in message and live.store.count() == before + 1
    assert "already in the collection" in client.predict([handle_file(str(upload))], "", api_name="/add")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(Exception, match="pickle"):
        client.predict([handle_file(str(bad))], "", api_name="/analyse")
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (6 * 2**20))  # over this app's 5 MB upload cap
    with pytest.raises(Exception, match=r"(?i)size|large|exceed|413"):  # refused before any handler runs
        client.predict([handle_file(str(big))], "", api_name="/analyse")
    assert live.store.count() == before + 1
    assert f"**{before + 1}** LoRAs" in client.predict(api_name="/status")  # still serving


def test_an_oversize_upload_is_refused_before_its_body_is_sent(app_url: str, gradio_temp: Path) -> None:
    host, port = app_url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
            f"boundary=b\r\nContent-Length: {CAP + 3 * 2**20}\r\n\r\n".encode()
        )
        start = time.perf_counter()
        reply = ""  # not one byte of the body was sent; read the whole answer (it may come in several packets)
        while "upload too large" not in reply and (chunk := sock.recv(4096)):
            reply += chunk.decode()
    assert reply.startswith("HTTP/1.1 413") and "upload too large" in reply, reply
    assert time.perf_counter() - start < 5
    assert left_in(gradio_temp) == []


def test_uploads_leave_nothing_in_gradios_folder_and_add_after_analyse_works(
    app_url: str, live: Explorer, gradio_temp: Path, tmp_path: Path
) -> None:
    client = Client(app_url, verbose=False)
    upload = tmp_path / "kept.safetensors"
    shutil.copyfile(DIGITS[220] / "adapter_model.safetensors", upload)
    try:
        assert "kept" in client.predict([handle_file(str(upload))], "", api_name="/analyse")[0]
        assert left_in(gradio_temp) == []  # analysed: moved out at once, held for Add
        before = live.store.count()
        assert "Added **kept**" in client.predict([], "", api_name="/add")  # no re-upload: the analysed one
        assert live.store.count() == before + 1 and left_in(gradio_temp) == []
        with pytest.raises(Exception, match="no file uploaded"):  # held uploads are used once
            client.predict([], "", api_name="/add")
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(pickle.dumps({"x": 1}))
        for endpoint in ("/analyse", "/add"):
            with pytest.raises(Exception, match="pickle"):
                client.predict([handle_file(str(bad))], "", api_name=endpoint)
        with pytest.raises(Exception, match="pickle"):
            client.predict([handle_file(str(bad))], api_name="/inspect")
        client.predict([handle_file(str(upload))], api_name="/inspect")
        assert left_in(gradio_temp) == []  # refused, added or inspected: nothing stays
    finally:
        client.close()


def test_no_server_path_in_the_page_or_in_api_messages(
    app_url: str, client: Client, live: Explorer, gradio_temp: Path, tmp_path: Path
) -> None:
    folders = {sys.prefix, str(Path(__file__).resolve().parent.parent), str(live.data_dir), str(gradio_temp)}
    for url in (app_url, app_url + "config"):
        with urllib.request.urlopen(url, timeout=30) as response:
            page = response.read().decode()
        assert not [f for f in folders if f in page], url
    with urllib.request.urlopen(app_url + "lol-assets/plotly.min.js", timeout=30) as response:
        assert "plotly.js" in response.read(300).decode()
    empty = tmp_path / "empty_file.safetensors"
    empty.write_bytes(b"")
    for path, name in ((empty, "empty_file.safetensors"), (DIGITS[0] / "adapter_config.json", ".safetensors")):
        with pytest.raises(Exception, match=name) as refused:
            client.predict([handle_file(str(path))], "", api_name="/analyse")
        message = str(getattr(refused.value, "message", refused.value))
        assert "\\" not in message and "/" not in message, message  # plain text: no escapes, no paths


def test_api_reports_a_failing_database_and_keeps_serving(
    client: Client, live: Explorer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lol_engine.errors import StoreError

    def full_disk(*args: object, **kwargs: object) -> None:
        raise StoreError("lol.duckdb: the write failed and nothing of it was stored (File too large)")

    monkeypatch.setattr(live.store, "add_many", full_disk)
    before = live.store.count()
    upload = tmp_path / "another.safetensors"
    shutil.copyfile(DIGITS[210] / "adapter_model.safetensors", upload)
    with pytest.raises(Exception, match="nothing of it was stored"):
        client.predict([handle_file(str(upload))], "", api_name="/add")
    monkeypatch.undo()
    assert live.store.count() == before
    assert "Added **another**" in client.predict([handle_file(str(upload))], "", api_name="/add")


def test_api_compare_and_collection(client: Client, live: Explorer) -> None:
    ids = [r["id"] for r in live.records() if r["zoo"] == "digits"][:2]
    text, _, table = client.predict(ids[0], ids[1], api_name="/compare")
    assert "ΔW cosine over 2 shared modules" in text and [r[0] for r in table["data"]] == ["fc1", "fc2"]
    page = client.predict("", "", "", 10_000, 0, api_name="/collection_rows")
    assert page["total"] == len(page["rows"]) == live.store.count()
    assert [r["id"] for r in client.predict(ids[0][:12], "", "", 10, 0, api_name="/collection_rows")["rows"]] == [
        ids[0]
    ]
    compared = client.predict(ids[0], ids[1], api_name="/comparison")
    assert compared["comparable"] and sorted(m["module"] for m in compared["modules"]) == ["fc1", "fc2"]


@pytest.mark.parametrize("same_file", [False, True], ids=["different-files", "one-file"])
def test_concurrent_uploads_all_answer(app_url: str, gradio_temp: Path, same_file: bool) -> None:
    results: dict[int, Any] = {}

    def upload(i: int) -> None:
        c = Client(app_url, verbose=False)
        lora = DIGITS[300 if same_file else 300 + i] / "adapter_model.safetensors"  # equal bytes: one Gradio path
        try:
            results[i] = c.predict([handle_file(str(lora))], "", api_name="/analyse")
        except Exception as exc:  # pragma: no cover - reported by the assertion below
            results[i] = exc
        finally:
            c.close()

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(8))
    for i, result in results.items():
        assert not isinstance(result, Exception), result
        n_digits = sum(n.startswith("digits-") for n in SHIPPED)  # one row per digits predictor
        assert f"{n_digits} of {len(SHIPPED)} fit" in result[0] and len(result[1]["data"]) == n_digits, i
    assert left_in(gradio_temp) == []


def _sync_playwright() -> Any:
    """Playwright's entry point, or a skip (a failure under ``LOL_REQUIRE_BROWSER=1``) naming what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = [what for what, ok in ((CHROMIUM, Path(CHROMIUM).exists()), ("playwright", sync_playwright)) if not ok]
    if missing:
        if os.environ.get("LOL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LOL_REQUIRE_BROWSER=1 but missing: {', '.join(missing)} (run make system-deps)")
        pytest.skip(f"missing for the browser test: {', '.join(missing)}")
    return sync_playwright


@contextmanager
def _page(app_url: str) -> Iterator[Any]:
    """A headless Chromium page on the app; no script error may happen on it."""
    sync_playwright = _sync_playwright()
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(app_url)
        yield page
        browser.close()
    assert not errors, errors


def _screenshots(tmp_path: Path) -> Path:
    shots = Path(os.environ.get("LOL_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def test_browser_upload_predict_map_click_and_lasso(app_url: str, tmp_path: Path) -> None:
    shots = _screenshots(tmp_path)
    with _page(app_url) as page:
        page.wait_for_selector("#upload-files", timeout=60_000)

        # upload & predict
        page.set_input_files("#upload-files input[type=file]", str(FASHION[41] / "adapter_model.safetensors"))
        page.wait_for_selector("#upload-files .file-preview, #upload-files table", timeout=30_000)
        page.click("#analyse-button")
        page.wait_for_function(
            "document.querySelector('#predictions')?.innerText.includes('fashion-gen-quality')", timeout=60_000
        )
        assert "Generation quality (judge score)" in page.inner_text("#predictions")
        assert "ΔW cosine" in page.inner_text("#upload-neighbours")
        page.wait_for_selector("#spectrum .js-plotly-plot", timeout=30_000)
        page.screenshot(path=str(shots / "upload.png"), full_page=True)

        # add the analysed upload (it left Gradio's folder at once; the page does not send it again)
        page.click("#add-button")
        page.wait_for_function("document.querySelector('#add-status')?.innerText.includes('Added')", timeout=60_000)

        # the map: plotly.js served by the app itself, points carry ids
        page.get_by_role("tab", name="Explore").click()
        page.wait_for_function(
            "Number(document.querySelector('#lol-map .lol-map')?.dataset.points || 0) > 0", timeout=60_000
        )
        n_points = int(page.eval_on_selector("#lol-map .lol-map", "e => e.dataset.points"))
        assert n_points >= 70

        # click a point → its card and neighbours
        box = page.locator("#lol-map .scatterlayer .point").nth(5).bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.wait_for_function("document.querySelector('#map-card')?.innerText.includes('sha256')", timeout=30_000)
        page.wait_for_function(
            "document.querySelector('#map-neighbours')?.innerText.includes('cosine')", timeout=30_000
        )

        # lasso the whole plot area → every point lands in the selection table
        area = page.locator("#lol-map .nsewdrag").first.bounding_box()
        assert area is not None
        x0, y0, w, h = area["x"], area["y"], area["width"], area["height"]
        corners = [(0.01, 0.01), (0.99, 0.01), (0.99, 0.99), (0.01, 0.99), (0.01, 0.02)]
        page.mouse.move(x0 + corners[0][0] * w, y0 + corners[0][1] * h)
        page.mouse.down()
        for fx, fy in corners[1:]:
            page.mouse.move(x0 + fx * w, y0 + fy * h, steps=10)
        page.mouse.up()
        page.wait_for_function("document.querySelectorAll('#map-selection tbody tr').length > 0", timeout=30_000)
        page.screenshot(path=str(shots / "explore.png"), full_page=True)


def test_browser_trains_a_predictor_and_the_next_upload_uses_it(app_url: str, tmp_path: Path) -> None:
    """The Train tab: pick a label and a model, train (progress, then scores beside the baselines), and the next
    upload's predictions include the new predictor."""
    shots = _screenshots(tmp_path)
    with _page(app_url) as page:
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-label input").click()
        page.keyboard.type("acc_own")
        page.get_by_role("option", name="acc_own", exact=True).click()
        page.locator("#train-model input").click()
        page.get_by_role("option", name="svd", exact=True).click()
        epochs = page.locator("#train-epochs input[type=number]")
        epochs.fill("3")
        epochs.press("Enter")
        page.click("#train-button")
        page.wait_for_function(
            "document.querySelector('#train-status')?.innerText.includes('registered as')", timeout=180_000
        )
        assert "baseline" in page.inner_text("#train-status")
        page.screenshot(path=str(shots / "train.png"), full_page=True)

        page.get_by_role("tab", name="Upload & predict").click()
        page.set_input_files("#upload-files input[type=file]", str(DIGITS[230] / "adapter_model.safetensors"))
        page.wait_for_selector("#upload-files .file-preview, #upload-files table", timeout=30_000)
        page.click("#analyse-button")
        page.wait_for_function(
            "document.querySelector('#predictions')?.innerText.includes('acc_own-svd')", timeout=60_000
        )


def test_the_readmes_gradio_client_example_runs(client: Client, app_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's ```python gradio_client block, run from the checkout against this live app."""
    import re

    root = Path(__file__).parent.parent
    (block,) = re.findall(r"```python gradio_client\n(.*?)```", (root / "README.md").read_text(), flags=re.S)
    assert "http://127.0.0.1:7860/" in block
    monkeypatch.chdir(root)
    printed: list[str] = []
    scope = {"__name__": "__readme__", "print": lambda *a, **k: printed.append(" ".join(map(str, a)))}
    exec(compile(block.replace("http://127.0.0.1:7860/", app_url), "README gradio_client", "exec"), scope)
    assert scope["lora"]["id"] == scope["first"] and len(scope["lora"]["neighbours"]) == 5
    assert scope["analysed"]["base_family"] == "digits-mlp" and scope["analysed"]["predictions"]
    assert any("digits-acc_own" in line for line in printed)
