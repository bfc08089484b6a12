"""Hostile inputs against ``lol inspect``: exit status, first error line, wall time and peak memory per input.

Every case of ``tests/hostile.py`` is written to a temporary folder and read by ``lol inspect --json`` in a fresh
process (peak memory is that process's own high-water mark, ``VmHWM``; for a killed read, ``wait4``'s maximum).
With ``--before DIR`` the same inputs are also read by the code in ``DIR`` (e.g. a ``git worktree`` of an older
commit), side by side in one run; ``--write FILE`` also saves the table as Markdown::

    git worktree add --detach /tmp/lol-before 6061e0d
    .venv/bin/python benchmarks/bench_hostile.py --before /tmp/lol-before --timeout 120 --write docs/HOSTILE_BENCH.md

Cases slower than ``--timeout`` seconds are killed and shown as such. Also prints the reader's work budget.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]

import torch  # noqa: E402
from bench_spectra import Config, sdxl_shapes, write_lora  # noqa: E402
from hostile import Case, _many_modules, cases  # noqa: E402


def controls() -> list[Case]:
    """Real-sized files that must pass the budget comfortably, read the same way for comparison."""

    def sdxl(folder: Path) -> Path:
        return write_lora(Config("sdxl-r32", sdxl_shapes(), 32), folder, torch.Generator().manual_seed(0))

    return [
        Case("control-sdxl-r32", "control: an SDXL kohya LoRA, rank 32 (986 modules)", sdxl, "", loads=True),
        Case(
            "control-20000-modules",
            "control: 20,000 rank-4 modules (at the module budget)",
            lambda f: _many_modules(f / "x.safetensors", 20_000, rank=4, d=64),
            "",
            loads=True,
        ),
    ]


# The child reports its own peak (VmHWM starts afresh at exec; ru_maxrss would carry the parent's size over the fork).
_PROBE = (
    "import atexit, sys\n"
    "def peak():\n"
    "    with open('/proc/self/status') as f, open(sys.argv[2], 'w') as out:\n"
    "        out.write(next(line.split()[1] for line in f if line.startswith('VmHWM')))\n"
    "atexit.register(peak)\n"
    "from lol_engine.cli import main\n"
    "sys.exit(main(['inspect', sys.argv[1], '--json']))"
)


@dataclass(frozen=True)
class Run:
    """One read of one input by one version of the code."""

    status: str  # "exit 0", "exit 2", "killed after N s", …
    line: str  # the first line on stderr, shortened
    seconds: float
    peak_mb: float


def read_with(code: Path, target: Path, timeout: float) -> Run:
    """Run ``lol inspect --json target`` with ``code`` first on the path, in its own process group."""
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE, str(target), str(peak_file)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=code,  # `python -c` puts the working folder first on the path, before PYTHONPATH
            start_new_session=True,
        )
        status = ""
        while True:
            pid, code_, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, code_, usage = os.wait4(proc.pid, 0)
                status = f"killed after {timeout:.0f} s"
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(code_)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
        peak_mb = int(peak_file.read_text()) / 1024 if peak_file.exists() else usage.ru_maxrss / 1024  # killed
    status = status or f"exit {proc.returncode}"
    line = ""
    if lines:
        line = lines[0] if lines[0].startswith("error:") else lines[-1]  # a traceback's last line names the crash
    return Run(status, line[:110], seconds, peak_mb)


def _commit(folder: Path) -> str:
    out = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="a checkout of older code to run side by side")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a read is killed")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run")
    parser.add_argument("--write", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    from lol_engine import ReadLimits

    print(f"work budget: {ReadLimits()}")
    versions = [("before", args.before.resolve())] if args.before else []
    versions.append(("now", ROOT))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in [*cases(), *controls()]:
            if args.only and case.name not in args.only:
                continue
            folder = Path(tmp) / case.name
            folder.mkdir()
            target = case.make(folder)
            size = sum(p.stat().st_size for p in ([target] if target.is_file() else target.iterdir()))
            runs = [read_with(code, target, args.timeout) for _, code in versions]
            rows.append((case, size, runs))
            for (label, _), run in zip(versions, runs, strict=True):
                print(
                    f"{case.name:36s} {label:6s} {run.status:18s} {run.seconds:8.2f} s {run.peak_mb:8.0f} MB  "
                    f"{run.line}",
                    flush=True,
                )
    header = "| input | size |" + "".join(f" {label}: result | {label}: time, peak memory |" for label, _ in versions)
    lines = [header, "|---|---:|" + "---|---:|" * len(versions)]
    for case, size, runs in rows:
        cells = "".join(
            f" {r.status}: {r.line.replace('|', '/')} | {r.seconds:.2f} s, {r.peak_mb:.0f} MB |" for r in runs
        )
        lines.append(f"| {case.what} | {size / 2**20:.2f} MiB |{cells}")
    print("\n" + "\n".join(lines))
    if args.write:
        intro = (
            "# Hostile inputs, read by `lol inspect --json` (generated by `benchmarks/bench_hostile.py`)\n\n"
            f"Command: `{' '.join(['python', 'benchmarks/bench_hostile.py', *sys.argv[1:]])}`"
            + (f" (before = commit {_commit(args.before)}, now = {_commit(ROOT)}); " if args.before else "; ")
            + f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs. Times include starting Python and importing torch "
            "(about 1.5 s); peak memory is the reading process's high-water mark. Work budget: "
            f"`{ReadLimits()}`.\n\n"
        )
        args.write.write_text(intro + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
