"""What an oversize upload costs the server: a generated ~1.9 GB LoRA-like body sent to a running ``lol serve``.

    python benchmarks/bench_upload_refusal.py              # 1.9 GB (1.9e9 bytes), the default cap
    python benchmarks/bench_upload_refusal.py --gb 0.2     # a quick run

A throw-away collection (one LoRA of the shipped digits zoo) is served by ``lol serve`` in a child process whose Gradio
temp folder (``GRADIO_TEMP_DIR``) lies in a fresh temporary folder. The body is generated on the fly (a safetensors
header naming one big tensor, then zeros: nothing is read from disk) and sent over a raw socket to Gradio's upload
route, the way the browser and ``gradio_client`` send files; the client stops sending as soon as a reply arrives.
If the upload is accepted, ``/analyse`` is called on it through Gradio's REST API, as the page would. Reported:

- seconds until the server answered the upload, and how much of the body it had received by then;
- the answer (status and text) and, if the upload was accepted, what ``/analyse`` said;
- bytes left in the Gradio temp folder after the answer(s), and after SIGTERM to the server;
- the server's peak resident memory (VmHWM) before the upload and at the end, and its exit status.

Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LORA = ROOT / "data" / "zoo" / "digits" / "loras" / "00000"
CHUNK = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vm(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` memory field in bytes (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _bytes_under(folder: Path) -> tuple[int, int]:
    """(number of files, total bytes) under ``folder``."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    return len(files), sum(p.stat().st_size for p in files)


_HEADER = 200  # bytes of safetensors JSON header (space-padded), after its 8-byte length


def _file_head(size: int) -> bytes:
    """The first bytes of the generated file: a safetensors header naming one F16 tensor filling the rest."""
    n = (size - 8 - _HEADER) // 2
    header = json.dumps({"lora_unet_x.lora_down.weight": {"dtype": "F16", "shape": [n], "data_offsets": [0, 2 * n]}})
    return _HEADER.to_bytes(8, "little") + header.encode().ljust(_HEADER, b" ")


def send_upload(port: int, size: int, timeout: float = 600.0) -> dict[str, object]:
    """POST a generated ``size``-byte file to /gradio_api/upload; stop sending once the server answers."""
    boundary = "lolbenchboundary7d1f"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + _file_head(size)
    tail = f"\r\n--{boundary}--\r\n".encode()
    zeros_total = size - 8 - _HEADER
    length = len(head) + zeros_total + len(tail)
    request = (
        f"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    start = time.perf_counter()
    sent, reply, error = 0, b"", ""
    zero = bytes(CHUNK)
    try:
        sock.sendall(request)
        pieces = [head]
        left = zeros_total
        while True:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            if pieces:
                piece = pieces.pop(0)
            elif left > 0:
                piece = zero[: min(CHUNK, left)]
                left -= len(piece)
            elif tail:
                piece, tail = tail, b""
            else:
                select.select([sock], [], [], timeout)
                break
            sock.sendall(piece)
            sent += len(piece)
    except OSError as exc:  # the server closed the connection while the body was still coming
        error = f"{type(exc).__name__}: {exc}"
    answered = time.perf_counter() - start
    try:
        while b"\r\n\r\n" not in reply or len(reply) < reply.index(b"\r\n\r\n") + 4 + _length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    except OSError as exc:
        error = error or f"{type(exc).__name__}: {exc}"
    sock.close()
    status = reply.split(b"\r\n", 1)[0].decode(errors="replace")
    text = reply.split(b"\r\n\r\n", 1)[1].decode(errors="replace") if b"\r\n\r\n" in reply else ""
    return {
        "seconds_to_answer": round(answered, 3),
        "body_bytes": length,
        "body_bytes_sent": sent,
        "status": status,
        "answer": text[:300],
        "send_error": error,
    }


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def analyse(port: int, server_path: str) -> tuple[float, str]:
    """Call /analyse on an uploaded file through Gradio's REST API; (seconds, the final event's data)."""
    start = time.perf_counter()
    upload = {"path": server_path, "orig_name": "big.safetensors", "meta": {"_type": "gradio.FileData"}}
    payload = {"data": [[upload], ""]}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/gradio_api/call/analyse",
        json.dumps(payload).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/call/analyse/{event_id}", timeout=600) as r:
        events = r.read().decode(errors="replace")
    return time.perf_counter() - start, " ".join(events.split())[-400:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.9, help="upload size in GB (10^9 bytes)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    tmp = Path(tempfile.mkdtemp(prefix="lol-bench-upload-"))
    gtemp, data = tmp / "gradio-temp", tmp / "data"
    env = {
        **os.environ,
        "GRADIO_TEMP_DIR": str(gtemp),
        "LOL_DATA_DIR": str(data),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
    }
    cli = [sys.executable, "-m", "lol_engine.cli"]
    result: dict[str, object] = {"upload_bytes": size}
    server = None
    try:
        subprocess.run(
            [*cli, "ingest", str(LORA), "--db", str(data / "lol.duckdb")],
            env=env,
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        port = _free_port()
        server = subprocess.Popen(
            [*cli, "serve", "--db", str(data / "lol.duckdb"), "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.5)
        result["server_peak_rss_before_mb"] = round(_vm(server.pid, "VmHWM") / 2**20)
        result.update(send_upload(port, size))
        files, nbytes = _bytes_under(gtemp)
        result["left_in_gradio_temp_after_answer"] = f"{files} files, {nbytes} bytes"
        if str(result["status"]).endswith("200 OK"):
            server_path = json.loads(str(result["answer"]))[0]
            seconds, message = analyse(port, server_path)
            result["analyse_seconds"] = round(seconds, 2)
            result["analyse_answer"] = message
            files, nbytes = _bytes_under(gtemp)
            result["left_in_gradio_temp_after_analyse"] = f"{files} files, {nbytes} bytes"
        result["server_peak_rss_end_mb"] = round(_vm(server.pid, "VmHWM") / 2**20)
        server.send_signal(signal.SIGTERM)
        try:
            result["server_exit_status"] = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            result["server_exit_status"] = "still running 60 s after SIGTERM (killed)"
        files, nbytes = _bytes_under(gtemp)
        result["left_in_gradio_temp_after_sigterm"] = f"{files} files, {nbytes} bytes"
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    for key, value in result.items():
        print(f"{key:36s} {value}")


if __name__ == "__main__":
    main()
