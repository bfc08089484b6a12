"""The launched app: its HTTP API driven with gradio_client, and the page driven in headless Chromium (Playwright).

The browser tests walk the page at a laptop's size (1366 × 768) and a phone's (390 × 844, touch), audit every tab
with axe-core (``tests/assets/axe.min.js``, offline) for serious and critical violations, and write README
screenshots (``<tab>-<desktop|phone>.png``) into ``LOL_SCREENSHOT_DIR`` when it is set
(``LOL_SCREENSHOT_DIR=docs/screenshots pytest tests/test_app_live.py -k browser``). They need Debian's ``chromium``
(``make system-deps``) and the ``playwright`` package (dev extra); they skip without them unless
``LOL_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import pickle
import re
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
    assert not (actions | data) - set(endpoints), (actions | data) - set(endpoints)
    assert "/predictors" in data
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


# A laptop, and a phone as Playwright's iPhone descriptors set it up (390 × 844 CSS px, 3 device px each, touch).
VIEWPORTS: dict[str, dict[str, Any]] = {
    "desktop": {"viewport": {"width": 1366, "height": 768}},
    "phone": {
        "viewport": {"width": 390, "height": 844},
        "device_scale_factor": 3,
        "is_mobile": True,
        "has_touch": True,
    },
}
TABS = {"upload": "Upload & predict", "explore": "Explore", "collection": "Collection", "compare": "Compare"}
TABS |= {"train": "Train", "inspect": "Inspect only"}
AXE = Path(__file__).parent / "assets" / "axe.min.js"  # axe-core 4.14.1 (MPL-2.0, see assets/README.md)
MAP = "#lol-map .lol-map"
SHOT_BYTES = 300_000  # a README screenshot at most


# What a timed-out wait reports of the page: the parts an upload, an add or a map click change, and any toast
SHOWN = ("#collection-status", "#upload-card", "#predictions", "#add-status", "#upload-files", "#map-card")


def _wait_for(page: Any, condition: str, arg: Any = None, timeout: float = 30_000) -> None:
    """``page.wait_for_function(condition, arg=arg)``; when it times out, the failure says what the page showed
    instead (the cards, the statuses, the toasts and the map's point count), so that a flake in CI can be read from
    its log."""
    try:
        page.wait_for_function(condition, arg=arg, timeout=timeout)
    except Exception as e:  # playwright's TimeoutError (playwright is imported only when the browser tests run)
        if type(e).__name__ != "TimeoutError":
            raise
        shown = page.evaluate(
            """([parts, map]) => {
              const text = (sel) => Array.from(document.querySelectorAll(sel), (e) => e.innerText.slice(0, 300));
              const out = Object.fromEntries(parts.map((sel) => [sel, text(sel).join(' | ')]));
              out.toasts = text('[data-testid=toast-body]');
              out.map_points = document.querySelector(map)?.dataset.points ?? null;
              return out; }""",
            [list(SHOWN), MAP],
        )
        raise AssertionError(f"waited {timeout / 1000:.0f} s for {condition}; the page showed {shown}") from e


def _open(browser: Any, url: str, viewport: str, errors: list[str]) -> Any:
    """A fresh page (its own context: no cookies, no session) on ``url``; script errors go to ``errors``."""
    context = browser.new_context(**VIEWPORTS[viewport], accept_downloads=True)
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#upload-files", state="attached", timeout=60_000)  # a shared address opens on Explore
    return page


@contextmanager
def _page(app_url: str, viewport: str = "desktop") -> Iterator[Any]:
    """A headless Chromium page on the app at ``viewport`` (a key of :data:`VIEWPORTS`); no script error may happen
    on it, nor on other pages opened with ``_open(page.context.browser, …, errors)``."""
    sync_playwright = _sync_playwright()
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        try:
            yield _open(browser, app_url, viewport, errors)
        finally:
            browser.close()
    assert not errors, errors


def _screenshots(tmp_path: Path) -> Path:
    shots = Path(os.environ.get("LOL_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def _screenshot(page: Any, path: Path) -> None:
    """The page from its top, at most two screens tall, in CSS pixels and a 256-colour palette: ≤ 300 KB."""
    from PIL import Image

    size = page.viewport_size
    height = min(page.evaluate("document.documentElement.scrollHeight"), 2 * size["height"])
    page.screenshot(path=str(path), full_page=True, scale="css", clip={"x": 0, "y": 0, **size, "height": height})
    with Image.open(path) as image:
        image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    assert path.stat().st_size <= SHOT_BYTES, (path.name, path.stat().st_size)


def _tab(page: Any, key: str) -> None:
    page.get_by_role("tab", name=TABS[key], exact=True).click()
    _wait_for(page, f"document.querySelector('[role=tab][data-tab-id={key}]')?.ariaSelected === 'true'")


# Serious by axe, in Gradio 6.31's own markup, and not mended by any attribute (app.web.APP_JS mends the rest):
# interactive elements nested in interactive elements. Each is named by its rule and the element axe reports.
GRADIO_NESTING = (
    (
        "nested-interactive",
        'button[aria-label="common.upload"]',
    ),  # a file box's "upload more" button holds a drop zone
    ("nested-interactive", ".toast-header"),  # an error toast's header (role=button) holds its close button
)


def _serious_violations(page: Any) -> list[str]:
    """axe-core's violations of impact serious or critical on the page as it is now (``rule: element  why``), less
    :data:`GRADIO_NESTING`."""
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.add_script_tag(content=AXE.read_text())
    found = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".filter((v) => v.impact === 'serious' || v.impact === 'critical')"
        ".flatMap((v) => v.nodes.map((n) => [v.id, n.target.join(' '), n.failureSummary || '']))"
    )
    return [f"{rule}: {target}  {why}" for rule, target, why in found if (rule, target) not in GRADIO_NESTING]


def _collection_count(page: Any) -> int:
    """The header's LoRA count (``**2,023** LoRAs in the collection``)."""
    text = page.inner_text("#collection-status")
    return int(text.split(" LoRAs")[0].split()[-1].replace(",", ""))


def _map_state(page: Any) -> dict[str, Any]:
    """What the map div says: points and matches shown, every id on the map, and the id the ring is on."""
    return dict(
        page.evaluate(
            """(sel) => { const gd = document.querySelector(sel); const ids = (gd.layout.meta || {}).ids || [];
            const ring = (gd.data || []).find((t) => t.name === 'clicked');
            const at = ring ? (gd._fullData.find((t) => t.name === 'clicked') || {}).customdata : null;
            return {points: Number(gd.dataset.points), matches: Number(gd.dataset.matches), ids: ids,
                    clicked: at && at.length ? ids[at[0]] : null}; }""",
            MAP,
        )
    )


def _point_on_screen(page: Any, lora_id: str) -> dict[str, float]:
    """Where ``lora_id``'s marker is drawn in the page (CSS px), from plotly's own axes: l2p plus the plot margins."""
    where = page.evaluate(
        """([sel, id]) => { const gd = document.querySelector(sel); const k = gd.layout.meta.ids.indexOf(id);
        const full = gd._fullLayout, box = gd.getBoundingClientRect();
        for (const t of gd._fullData) {
          if (t.type !== 'scattergl' || !t.customdata || t.name === 'clicked') continue;
          const j = Array.prototype.indexOf.call(t.customdata, k);
          if (j >= 0) return {x: box.left + full._size.l + full.xaxis.l2p(t.x[j]),
                              y: box.top + full._size.t + full.yaxis.l2p(t.y[j])};
        }
        return null; }""",
        [MAP, lora_id],
    )
    assert where is not None, f"{lora_id} is not drawn on the map"
    return dict(where)


def _upload_and_analyse(page: Any, path: Path) -> None:
    """Drop ``path`` in the file box (once the last analysis has emptied it) and press *Analyse* with that one file in
    the box.

    The wait reads the box's file rows, not its text: a row's name cell is a flex box, so ``innerText`` splits the
    name over two lines; only Gradio's upload-progress view shows it whole, and only while the upload runs. The file
    is dropped again only when a late clear (the one that follows the last analysis or add) has emptied the box: a
    second drop into a box that shows the file would add a second file, and the analysis would refuse the pair."""
    page.wait_for_selector("#upload-files .file-preview", state="detached")
    names = "Array.from(document.querySelectorAll('#upload-files .file-preview td.filename'), (td) => td.textContent)"
    shown = f"{names}.map((name) => name.replace(/\\s+/g, '')).join('|') === {json.dumps(path.name)}"
    for attempt in range(2):
        page.set_input_files("#upload-files input[type=file]", str(path))
        _wait_for(page, shown, timeout=60_000)
        page.wait_for_timeout(1_500)  # a late clear empties the box within a moment of the drop showing
        if page.query_selector("#upload-files .file-preview") is not None:
            break
        assert not attempt, f"the file box was emptied twice after {path.name} was dropped in it"
    page.click("#analyse-button")


def _tap(page: Any, viewport: str, where: dict[str, float]) -> None:
    """A click on a laptop, a tap (touch events) on the phone."""
    if VIEWPORTS[viewport].get("has_touch"):
        page.touchscreen.tap(where["x"], where["y"])
    else:
        page.mouse.click(where["x"], where["y"])


def _predict_and_add(page: Any, lora: Path, viewport: str, shots: Path) -> None:
    """Upload & predict: the card, its predictions and neighbours, then *Add to collection*."""
    _tab(page, "upload")
    _upload_and_analyse(page, lora / "adapter_model.safetensors")
    _wait_for(
        page, "document.querySelector('#predictions')?.innerText.includes('fashion-gen-quality')", timeout=60_000
    )
    predictions = page.inner_text("#predictions")
    assert "likely range (90 %)" in predictions and "Generation quality (judge score)" in predictions
    assert "sha256" in page.inner_text("#upload-card").lower()
    assert "ΔW cosine" in page.inner_text("#upload-neighbours")
    page.wait_for_selector("#spectrum .js-plotly-plot", timeout=30_000)
    _screenshot(page, shots / f"upload-{viewport}.png")
    page.click("#add-button")
    _wait_for(page, "document.querySelector('#add-status')?.innerText.includes('Added')", timeout=60_000)


def _click_new_point(page: Any, viewport: str, new_id: str) -> None:
    """Find the new LoRA by id prefix with *Zoom to matches* (it stands apart there), then click its marker."""
    page.locator("#map-zoom input").check()
    search = page.locator("#map-search textarea, #map-search input").first
    search.fill(new_id[:12])
    search.press("Enter")
    _wait_for(page, f"document.querySelector('{MAP}').dataset.matches === '1'", timeout=30_000)
    page.wait_for_timeout(500)  # the zoomed view is drawn
    _tap(page, viewport, _point_on_screen(page, new_id))
    _wait_for(page, f"document.querySelector('#map-card')?.innerText.includes('{new_id}')", timeout=30_000)
    _wait_for(page, f"(document.querySelector('{MAP}').data || []).some((t) => t.name === 'clicked')", timeout=30_000)
    assert _map_state(page)["clicked"] == new_id  # the ring is on it
    assert f"lora={new_id}" in page.url


def _open_a_neighbour(page: Any, clicked: str) -> str:
    """Click the first neighbour row: the card, the ring and the address follow it; returns its id."""
    _wait_for(page, "document.querySelector('#map-neighbours')?.innerText.includes('ΔW cosine')")
    row = page.locator("#map-neighbours .virtual-row[role=row]").first  # Gradio's table: rows are divs
    cells = row.locator("[role=gridcell]")
    neighbour = cells.last.inner_text().strip()
    assert len(neighbour) == 64 and neighbour != clicked, neighbour
    cells.first.click()
    _wait_for(page, f"document.querySelector('#map-card')?.innerText.includes('{neighbour}')", timeout=30_000)
    _wait_for(page, f"window.location.search.includes('lora={neighbour}')", timeout=30_000)
    _wait_for(
        page,
        """([sel, id]) => { const gd = document.querySelector(sel);
        const t = (gd._fullData || []).find((t) => t.name === 'clicked');
        return t && gd.layout.meta.ids[t.customdata[0]] === id; }""",
        arg=[MAP, neighbour],
        timeout=30_000,
    )
    return neighbour


def _lasso_and_export(page: Any, tmp_path: Path) -> None:
    """Clear the search (the whole map again), lasso the whole plot area, export the selection as CSV."""
    search = page.locator("#map-search textarea, #map-search input").first
    search.fill("")
    search.press("Enter")
    _wait_for(page, f"document.querySelector('{MAP}').dataset.matches === '0'", timeout=30_000)
    page.wait_for_timeout(500)
    points = _map_state(page)["points"]
    page.hover(MAP)
    page.locator("#lol-map .modebar-btn[data-val='lasso']").first.click()
    area = page.locator("#lol-map .nsewdrag").first.bounding_box()
    assert area is not None
    x0, y0, w, h = area["x"], area["y"], area["width"], area["height"]
    corners = [(0.01, 0.01), (0.99, 0.01), (0.99, 0.99), (0.01, 0.99), (0.01, 0.02)]
    page.mouse.move(x0 + corners[0][0] * w, y0 + corners[0][1] * h)
    page.mouse.down()
    for fx, fy in corners[1:]:
        page.mouse.move(x0 + fx * w, y0 + fy * h, steps=10)
    page.mouse.up()
    _wait_for(
        page,  # every point, and the header row
        f"document.querySelector('#map-selection [role=grid]')?.ariaRowCount === '{points + 1}'",
        timeout=30_000,
    )
    page.get_by_role("button", name="Export selection as CSV").click()
    link = page.locator("#map-download a[download]").first
    link.wait_for(timeout=30_000)
    with page.expect_download() as info:
        link.click()
    download = info.value
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    rows = saved.read_text().splitlines()
    assert saved.suffix == ".csv" and len(rows) == points + 1, (saved.name, len(rows), points)  # header + every point
    # named after what it holds: every LoRA of the map, so several collections ("selection"), and how many
    assert re.fullmatch(rf"lol-selection-{points}loras-\d{{8}}-\d{{4}}\.csv", saved.name), saved.name


def _phone_layout(page: Any) -> None:
    """On a phone every tab is in view (no overflow menu) and the map starts within the first screen."""
    for name in TABS.values():
        tab = page.get_by_role("tab", name=name, exact=True)
        box = tab.bounding_box()
        assert tab.is_visible() and box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, name
    assert not page.get_by_role("button", name="More tabs").is_visible()
    top = page.eval_on_selector(MAP, "e => e.getBoundingClientRect().top + window.scrollY")
    assert top < 600, top  # 702 px before the phone layout (Explore controls one to a row, tabs behind "…")


@pytest.mark.parametrize(("viewport", "lora"), [("desktop", 41), ("phone", 42)])
def test_browser_walk_upload_add_map_click_neighbour_lasso_export(
    app_url: str, tmp_path: Path, viewport: str, lora: int
) -> None:
    """The page as someone uses it, at a laptop's and a phone's size: upload and predict, add, find the new point on
    the map without a reload, click it, follow a neighbour, lasso and export, share the address. axe-core finds no
    serious or critical violation on any tab; README screenshots when ``LOL_SCREENSHOT_DIR`` is set."""
    shots = _screenshots(tmp_path)
    with _page(app_url, viewport) as page:
        _tab(page, "explore")
        _wait_for(page, f"Number(document.querySelector('{MAP}')?.dataset.points || 0) > 0", timeout=60_000)
        before, count = _map_state(page), _collection_count(page)
        if viewport == "phone":
            _phone_layout(page)

        _predict_and_add(page, FASHION[lora], viewport, shots)
        _tab(page, "explore")  # no reload: the add refreshed the header and the map
        _wait_for(
            page, f"Number(document.querySelector('{MAP}').dataset.points) === {before['points'] + 1}", timeout=60_000
        )
        assert _collection_count(page) == count + 1
        (new_id,) = set(_map_state(page)["ids"]) - set(before["ids"])

        _click_new_point(page, viewport, new_id)
        neighbour = _open_a_neighbour(page, new_id)
        shared = page.url
        _lasso_and_export(page, tmp_path)
        _screenshot(page, shots / f"explore-{viewport}.png")
        violations = _serious_violations(page)
        assert violations == [], violations

        for key in ("upload", "collection", "compare", "train", "inspect"):
            _tab(page, key)
            page.wait_for_timeout(800)  # the tab's first render and its load events
            violations = _serious_violations(page)
            assert violations == [], (key, violations)
            _screenshot(page, shots / f"{key}-{viewport}.png")

        errors: list[str] = []  # the shared address shows the same LoRA in a new page
        fresh = _open(page.context.browser, shared, viewport, errors)
        _wait_for(
            fresh,  # it opens on the Explore tab by itself
            "document.querySelector('[role=tab][data-tab-id=explore]')?.ariaSelected === 'true'",
            timeout=60_000,
        )
        _wait_for(fresh, f"document.querySelector('#map-card')?.innerText.includes('{neighbour}')", timeout=60_000)
        _wait_for(fresh, f"(document.querySelector('{MAP}')?.data || []).some((t) => t.name === 'clicked')")
        assert not errors, errors


def test_browser_error_toast_is_plain_text_and_clears_the_card(app_url: str, tmp_path: Path) -> None:
    """A file that is not a LoRA: the toast says so in plain text (no Markdown escapes such as ``notes\\.safetensors``,
    no server path), and the previous upload's card and predictions are gone, not left under the error."""
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes, not a LoRA\n")
    with _page(app_url) as page:
        _upload_and_analyse(page, FASHION[43] / "adapter_model.safetensors")
        _wait_for(
            page, "document.querySelector('#predictions')?.innerText.includes('fashion-gen-quality')", timeout=60_000
        )
        previous = page.inner_text("#upload-card").split("sha256")[1].split()[0]
        _upload_and_analyse(page, notes)
        toast = page.locator("[data-testid=toast-text]").first
        toast.wait_for(timeout=60_000)
        text = toast.inner_text()
        assert "notes.safetensors" in text and "\\" not in text and str(tmp_path) not in text, text
        assert previous not in page.inner_text("#upload-card")
        _wait_for(
            page,  # and the card says why it is empty, not "Analysing…"
            "document.querySelector('#upload-card')?.innerText.includes('Nothing to show')",
            timeout=30_000,
        )
        assert "fashion-gen" not in page.inner_text("#predictions")
        assert "ΔW cosine" not in page.inner_text("#upload-neighbours")
        page.wait_for_timeout(1_500)  # the toast's fade-in is over: axe measures the colours it ends with
        violations = _serious_violations(page)
        assert violations == [], violations
        with pytest.raises(AssertionError, match=r"the page showed .*Nothing to show.*notes\.safetensors"):
            _wait_for(page, "false", timeout=200)  # a wait that times out says what the page showed: card, toast


def test_browser_trains_a_predictor_and_the_next_upload_uses_it(app_url: str, tmp_path: Path) -> None:
    """The Train tab: pick a label and a model, train (progress, then scores beside the baselines), and the next
    upload's predictions include the new predictor."""
    shots = _screenshots(tmp_path)
    with _page(app_url) as page:
        _tab(page, "train")
        page.locator("#train-label input").click()
        page.keyboard.type("acc_own")
        page.get_by_role("option", name="acc_own", exact=True).click()
        page.locator("#train-model input").click()
        page.get_by_role("option", name="svd", exact=True).click()
        epochs = page.locator("#train-epochs input[type=number]")
        epochs.fill("3")
        epochs.press("Enter")
        page.click("#train-button")
        _wait_for(
            page, "document.querySelector('#train-status')?.innerText.includes('registered as')", timeout=180_000
        )
        assert "baseline" in page.inner_text("#train-status")
        _screenshot(page, shots / "train.png")

        _tab(page, "upload")
        _upload_and_analyse(page, DIGITS[230] / "adapter_model.safetensors")
        _wait_for(page, "document.querySelector('#predictions')?.innerText.includes('acc_own-svd')", timeout=60_000)


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
