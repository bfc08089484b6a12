"""Device follows the inputs: the toolkit on CUDA tensors matches the CPU (run with ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from lol_engine.fingerprint import fingerprint
from lol_engine.spec import LayerSpec, LoraSpec
from lol_engine.symmetry import act_gl, lora_cosine, lora_singular_values, random_gl_like
from lol_engine.testing import random_lora

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_toolkit_on_cuda_matches_cpu() -> None:
    spec = LoraSpec((LayerSpec("layers.0.q_proj", 64, 48, 4), LayerSpec("layers.0.v_proj", 16, 48, 4)))
    cpu = random_lora(spec, generator=torch.Generator().manual_seed(0))
    gpu = cpu.to("cuda")
    spectra = lora_singular_values(gpu)
    assert all(s.device.type == "cuda" for s in spectra.values())
    for name, sigma in lora_singular_values(cpu).items():
        torch.testing.assert_close(spectra[name].cpu(), sigma)
    moved = act_gl(gpu, random_gl_like(gpu))
    assert moved.device.type == "cuda"
    assert lora_cosine(gpu, moved) == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(fingerprint(gpu), fingerprint(cpu))


def test_training_runs_on_cuda_and_saves_a_cpu_predictor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``TrainConfig(device="cuda")``: the model and the splits live on the GPU; the saved predictor loads anywhere."""
    from pathlib import Path

    from lol_engine.train import TrainConfig, load_predictor, load_zoo, save_predictor, train_on_zoo
    from lol_engine.train.loop import LoadedZoo

    zoo = load_zoo(Path(__file__).parent.parent / "data" / "zoo" / "digits")
    zoo = LoadedZoo(zoo.path, zoo.rows[:200], zoo.loras[:200])
    for name in ("spectral_glnet", "module_tokens"):
        model, task, result = train_on_zoo(zoo, "acc_own", name, config=TrainConfig(epochs=2, device="cuda"))
        assert next(model.parameters()).device.type == "cuda"
        assert all(torch.isfinite(torch.tensor(v)) for v in result["test"].values())
        save_predictor(tmp_path / name, model, task, name, True)
        predictor = load_predictor(tmp_path / name)
        assert next(predictor.model.parameters()).device.type == "cpu"
        predictor.predict(zoo.loras[0])
