"""What the app's web server adds to Gradio: the upload cap, early refusal of oversize bodies, a path-free script URL.

- **The cap.** ``LOL_MAX_UPLOAD`` (read by :mod:`lol_engine.settings`; default ``1.5gb``: a Flux LoRA at rank 128
  is ~1.3 GB; units are Gradio's, 1 gb = 2³⁰ bytes) is given to Gradio (``launch(max_file_size=…)``, checked per
  file as the body streams in, and in the browser before sending) and to the reader (:class:`lol_engine.ReadLimits`
  ``max_file_bytes``), so both agree.
- **Early refusal.** Gradio's own check fires only once a cap's worth of the body has arrived and been written to its
  temp folder. :class:`UploadGuard` answers ``413`` from the request's ``Content-Length`` before reading any of the
  body; a body without one (chunked) still meets Gradio's streaming check. It also tells the
  :class:`app.uploads.UploadLedger` which files each accepted upload left, so that one shared by two sessions stays
  until both used it.
- **plotly.js** is served at :data:`PLOTLY_URL` (a fixed, relative URL), so no page names a server folder.

:func:`launch_options` gathers these for ``demo.launch(**launch_options(cap, ledger))``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import plotly

from app.uploads import UploadLedger
from lol_engine.settings import DEFAULT_MAX_UPLOAD, Settings, parse_size

__all__ = [
    "APP_CSS",
    "APP_JS",
    "DEFAULT_MAX_UPLOAD",
    "PLOTLY_JS",
    "PLOTLY_URL",
    "UploadGuard",
    "launch_options",
    "max_upload_bytes",
    "parse_size",
]

PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
# The page's own styles. Text contrast of at least 4.5:1 (WCAG AA, checked by axe-core in tests/test_app_live.py)
# where Gradio's defaults fall short: the primary button's white on orange (2.8:1), the selected tab's orange on white
# (2.8:1), the footer's and the subdued grey (upload "- or -", a slider's maximum; 1.9:1). On a phone (≤ 640 px): less
# padding, the title and the collection line short, the Explore controls two to a row, so that the tabs (wrapped onto
# rows, never behind an overflow menu: ``gr.Tabs(overflow_behavior="wrap")``) and the map come first.
APP_CSS = """
:root, .dark {
  --button-primary-background-fill: #b7410e;
  --button-primary-background-fill-hover: #8f330b;
  --button-primary-border-color: #b7410e;
  --button-primary-text-color: #ffffff;
  --button-primary-text-color-hover: #ffffff;
}
:root { --color-accent: #b7410e; --body-text-color-subdued: #5d5d68; }
.dark { --color-accent: #fb923c; --body-text-color-subdued: #a1a1aa; }
footer, footer a, footer button, footer span { color: #3b3b3b !important; opacity: 1 !important; }
.dark footer, .dark footer a, .dark footer button, .dark footer span { color: #d4d4d8 !important; }
.lol-map:focus-visible { outline: 3px solid #1f5fbf; outline-offset: 2px; }
#map-card code, #upload-card code { overflow-wrap: anywhere; }  /* a sha256 wraps: no sideways scroll on a phone */
.gradio-container > .main.app {  /* Gradio keeps only top-level rules unscoped, so no @media: 10 px under 640 px */
  padding-left: clamp(10px, (100vw - 640px) * 1000, var(--size-8));
  padding-right: clamp(10px, (100vw - 640px) * 1000, var(--size-8));
}
@media (max-width: 640px) {
  * { --layout-gap: 8px; }
  #app-title h1 { font-size: 1.25rem; margin: 0; }
  #app-title p { display: none; }
  #collection-status { font-size: 0.8rem; }
  #collection-status p {
    display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 2; line-clamp: 2; overflow: hidden;
    margin: 0;
  }
  .form:has(> #map-choice), .form:has(> #map-zoom) { flex-direction: row !important; flex-wrap: wrap !important; }
  #map-choice, #color-by, #map-zoom, #map-density { flex: 1 1 40% !important; min-width: 40% !important; }
  #map-search { flex: 1 1 100% !important; }
  .lol-map { min-height: 360px !important; }
}
"""
# Gradio 6.31 markup that axe-core finds serious, repaired in the page as it appears (Gradio renders tabs lazily and
# redraws components, so an observer re-applies it; every change is idempotent): an empty plot's or file's
# placeholder labelled without a role (given ``role="img"``), a table's search box named by its title only (given that
# name as ``aria-label``), and an upload area whose label does not contain its visible text "Drop File Here - or -
# Click to Upload" (labelled with that text). Two nestings of Gradio's own remain (a button in the file box's "upload
# more" button, and a toast's close button in its header): no attribute mends those, see tests/test_app_live.py.
APP_JS = """
() => {
  const repair = () => {
    document.querySelectorAll('div.empty[aria-label]:not([role])').forEach((e) => e.setAttribute('role', 'img'));
    document.querySelectorAll('input.search-input[title]:not([aria-label])').forEach(
      (e) => e.setAttribute('aria-label', e.title));
    document.querySelectorAll('button.upload-container[aria-label]').forEach((e) => {
      const text = e.innerText.replace(/\\s+/g, ' ').trim();
      if (text && e.getAttribute('aria-label') !== text) e.setAttribute('aria-label', text);
    });
  };
  let queued = false;
  new MutationObserver(() => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; repair(); });
  }).observe(document.body, {childList: true, subtree: true});
  repair();
}
"""
PLOTLY_URL = "lol-assets/plotly.min.js"  # relative: also right behind a proxy that serves the app under a prefix
UPLOAD_SLACK = 2 * 2**20  # multipart framing and an adapter_config.json (≤ 1 MiB) beside the LoRA
OTHER_BODY_LIMIT = 64 * 2**20  # every other request: JSON of events (a table sent back for export is a few MB)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def max_upload_bytes(environ: Mapping[str, str] = os.environ) -> int:
    """The per-file upload cap: ``LOL_MAX_UPLOAD`` (e.g. ``200mb``), else :data:`DEFAULT_MAX_UPLOAD` (see
    :mod:`lol_engine.settings`); a bad value is a :class:`~lol_engine.errors.BadRequestError` naming the variable."""
    return Settings.from_env(environ).max_upload


def _shown(size: int) -> str:
    return f"{size / 2**30:.2f} GB" if size >= 2**30 else f"{size / 2**20:.1f} MB"


class UploadGuard:
    """ASGI middleware: refuse an oversize body unread (413), and note the files of accepted uploads in ``ledger``.

    Uploads (``…/gradio_api/upload``) may carry ``max_upload`` bytes of file plus :data:`UPLOAD_SLACK`; any other
    request :data:`OTHER_BODY_LIMIT`. The reply comes before any of the body is read, and the server then closes the
    connection instead of draining it.
    """

    def __init__(self, app: ASGIApp, max_upload: int, ledger: UploadLedger | None = None) -> None:
        self.app = app
        self.max_upload = max_upload
        self.ledger = ledger

    @staticmethod
    def is_upload(path: str) -> bool:
        """Whether a request path is Gradio's upload route."""
        return path.rstrip("/").endswith("/gradio_api/upload")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = self.is_upload(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _reply(send, 400, "invalid Content-Length")
                return
            if size > (self.max_upload + UPLOAD_SLACK if upload else OTHER_BODY_LIMIT):
                what, limit = ("upload", self.max_upload) if upload else ("request", OTHER_BODY_LIMIT)
                await _reply(send, 413, f"{what} too large: {_shown(size)}; this server accepts up to {_shown(limit)}")
                return
        if upload and self.ledger is not None:
            send = _noting(send, self.ledger)
        await self.app(scope, receive, send)


def _noting(send: Send, ledger: UploadLedger) -> Send:
    """``send``, also noting in ``ledger`` the paths of a successful upload reply (a JSON list of paths)."""
    status, body = 0, bytearray()

    async def wrapped(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and status == 200 and len(body) < 2**20:
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                try:
                    paths = json.loads(bytes(body))
                except ValueError:
                    paths = None
                if isinstance(paths, list):
                    ledger.note([p for p in paths if isinstance(p, str)])
        await send(message)

    return wrapped


async def _reply(send: Send, status: int, text: str) -> None:
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _plotly_js(request: Any) -> Any:
    from starlette.responses import FileResponse

    return FileResponse(PLOTLY_JS, media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"})


def launch_options(max_upload: int, ledger: UploadLedger | None = None) -> dict[str, Any]:
    """``demo.launch`` keywords for the cap, :class:`UploadGuard` (noting uploads in ``ledger``, the one given to
    ``build_demo``) and the plotly.js route."""
    from starlette.middleware import Middleware
    from starlette.routing import Route

    return {
        "css": APP_CSS,
        "js": APP_JS,
        "max_file_size": max_upload,
        "app_kwargs": {
            "middleware": [Middleware(UploadGuard, max_upload=max_upload, ledger=ledger)],
            "routes": [Route("/" + PLOTLY_URL, _plotly_js, methods=["GET", "HEAD"])],
        },
    }
