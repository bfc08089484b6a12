"""Training from the app: one job at a time in a background thread, with progress and a cancel switch.

The Train tab's event only starts a job and then polls it (:meth:`TrainingJob.status`), so training never holds the
request threads other users need; :meth:`TrainingJob.cancel` stops it after the current epoch (nothing is saved).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lol_engine.errors import BadRequestError, LolError
from lol_engine.train.collection import TrainingReport

__all__ = ["TrainingJob", "TrainingJobs"]

Progress = Callable[[int, int, int, float], bool]


@dataclass
class TrainingJob:
    """One training run: its progress, its outcome (a report or an error message), and a cancel switch."""

    description: str
    seeds: int
    started: float = field(default_factory=time.monotonic)
    seed: int = 0
    epoch: int = 0
    epochs: int = 0
    val_loss: float = float("nan")
    report: TrainingReport | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def progress(self, seed: int, epoch: int, epochs: int, val_loss: float) -> bool:
        """The epoch callback: records where training is; False once cancelled."""
        self.seed, self.epoch, self.epochs, self.val_loss = seed, epoch, epochs, val_loss
        return not self.cancelled.is_set()

    def cancel(self) -> None:
        """Stop after the current epoch."""
        self.cancelled.set()

    @property
    def fraction(self) -> float:
        """How far it is, 0…1."""
        if self.done.is_set():
            return 1.0
        total = max(1, self.seeds * max(self.epochs, 1))
        return min(1.0, (self.seed * max(self.epochs, 1) + self.epoch) / total)

    def status(self) -> str:
        """One line: what it does and how far it is."""
        elapsed = time.monotonic() - self.started
        if self.error is not None:
            return f"{self.description}: {self.error}"
        if self.report is not None:
            return f"{self.description}: done in {elapsed:.0f} s"
        if self.epochs == 0:
            return f"{self.description}: reading the LoRAs… ({elapsed:.0f} s)"
        return (
            f"{self.description}: seed {self.seed + 1} of {self.seeds}, epoch {self.epoch} of {self.epochs}, "
            f"validation loss {self.val_loss:.4g} ({elapsed:.0f} s)"
        )


class TrainingJobs:
    """At most one training at a time (training takes the CPU or GPU it runs on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: TrainingJob | None = None

    def start(self, description: str, seeds: int, run: Callable[[Progress], TrainingReport]) -> TrainingJob:
        """Start ``run(progress)`` in a daemon thread; :class:`BadRequestError` while another job runs."""
        with self._lock:
            if self.current is not None and not self.current.done.is_set():
                raise BadRequestError(f"a training is running ({self.current.description}); wait for it or cancel it")
            job = TrainingJob(description, seeds)
            self.current = job

        def work() -> None:
            try:
                job.report = run(job.progress)
            except LolError as exc:
                job.error = str(exc)
            except Exception as exc:  # a bug: the job says so; the app keeps serving
                job.error = f"training failed ({type(exc).__name__})"
                raise
            finally:
                job.done.set()

        threading.Thread(target=work, name="lol-training", daemon=True).start()
        return job

    def cancel(self) -> bool:
        """Cancel the running job, if any; returns whether there was one."""
        with self._lock:
            job = self.current
        if job is None or job.done.is_set():
            return False
        job.cancel()
        return True

    def wait(self, job: TrainingJob, poll_s: float = 0.5) -> Any:
        """Yield ``job`` every ``poll_s`` seconds until it is done (then once more)."""
        while not job.done.wait(poll_s):
            yield job
        yield job
