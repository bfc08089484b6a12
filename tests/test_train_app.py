"""The Train tab's functions (no gradio): a background job with progress, held-out scores beside baselines, the
predictor applied to the next upload, one job at a time, and cancellation that saves nothing."""

from __future__ import annotations

import pytest
from collection import ZOOS, mini_zoo

pytest.importorskip("gradio")

from app import handlers
from app.training import TrainingJobs
from lol_engine.errors import BadRequestError
from lol_engine.explorer import Explorer


@pytest.fixture(scope="module")
def explorer(tmp_path_factory: pytest.TempPathFactory) -> Explorer:
    root = tmp_path_factory.mktemp("train-app")
    opened = Explorer.open(root / "data" / "lol.duckdb")
    opened.start([mini_zoo(root / "zoos", "digits", 80)], progress=False)
    yield opened
    opened.close()


def test_train_in_the_background_and_use_it_for_the_next_upload(explorer: Explorer) -> None:
    options = handlers.train_options(explorer)
    assert "acc_own" in options["labels"] and options["families"] == ["digits-mlp"] and "svd" in options["models"]
    jobs = TrainingJobs()
    job = handlers.start_training(explorer, jobs, "acc_own", "svd", epochs=4, seeds=1)
    seen = [(state.epoch, state.fraction) for state in jobs.wait(job, poll_s=0.05)]
    assert job.error is None and job.report is not None, job.error
    assert seen[-1] == (4, 1.0) and all(0.0 <= f <= 1.0 for _, f in seen)
    text, table = handlers.training_result(job)
    assert "done in" in text and "registered as acc\\_own\\-svd" in text and "split by LoRA" in text
    assert str(explorer.data_dir) not in text and "predictor:" not in text  # no server path in the page
    assert list(table["score"]) == [
        "LoL model: r2 (mean of seeds)",
        "LoL model: spearman (mean of seeds)",
        "LoL model: kendall (mean of seeds)",
        "baseline: mean r2",
        "baseline: ridge on fingerprint r2",
    ]
    analysis = explorer.analyse(ZOOS / "digits" / "loras" / "00900")  # the next upload: the new predictor applies
    assert analysis.estimates["acc_own-svd"].kind == "regression"
    assert "lol:acc_own-svd" in explorer.maps()


def test_one_job_at_a_time_and_cancel_saves_nothing(explorer: Explorer) -> None:
    jobs = TrainingJobs()
    job = handlers.start_training(explorer, jobs, "acc_all", "mlp", epochs=200, seeds=1)
    with pytest.raises(BadRequestError, match="a training is running"):
        handlers.start_training(explorer, jobs, "acc_all", "mlp", epochs=2)
    assert jobs.cancel()
    for _ in jobs.wait(job, poll_s=0.05):
        pass
    assert job.report is None and "stopped on request" in (job.error or "")
    assert not (explorer.predictors_dir / "acc_all-mlp").exists() and "acc_all-mlp" not in explorer.predictors
    assert not jobs.cancel()  # nothing runs now
    with pytest.raises(BadRequestError, match="pick a label"):
        handlers.start_training(explorer, jobs, None)
    with pytest.raises(BadRequestError, match="unknown model 'nope'"):
        handlers.start_training(explorer, jobs, "acc_own", "nope")
