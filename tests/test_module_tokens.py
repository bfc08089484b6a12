"""``module_tokens`` as math (float64): GL invariance, rank padding, α ↔ B rescaling, zero module = absent module,
any subset of modules, batch independence, sensitivity; its batch, its save/load round trip and its training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lol_engine.lora.weights import LoraModule, LoraWeights
from lol_engine.nn import LoraBatch, ModelConfig, ModuleSetBatch, SpecMismatchError, build_model, module_identity
from lol_engine.nn.module_tokens import ModuleIdentity, ModuleTokenNet
from lol_engine.spec import LayerSpec, LoraSpec
from lol_engine.testing import assert_gl_invariant, assert_gl_sensitive, random_lora
from lol_engine.train.checkpoint import load_predictor, save_predictor
from lol_engine.train.loop import LoadedZoo, TrainConfig, train_on_zoo
from lol_engine.train.tasks import Task

CONFIG = ModelConfig(hidden=16, width=4, tokens=16, heads=2, blocks=1, dropout=0.0, spectrum=5)


def _layer(i: int, role: str, rank: int = 3) -> LayerSpec:
    d_out = {"q_proj": 12, "v_proj": 6, "up_proj": 16}[role]
    module = "mlp" if role == "up_proj" else "self_attn"
    return LayerSpec(f"model.layers.{i}.{module}.{role}", d_out, 12, rank)


VOCAB = LoraSpec(tuple(_layer(i, role) for i in range(3) for role in ("q_proj", "v_proj", "up_proj")))
SUBSET = LoraSpec((_layer(0, "q_proj", 2), _layer(2, "v_proj", 4), _layer(1, "up_proj", 3)))  # other ranks too


@pytest.fixture
def model() -> ModuleTokenNet:
    torch.manual_seed(0)
    net = build_model("module_tokens", VOCAB, out_dim=3, config=CONFIG).double().eval()
    assert isinstance(net, ModuleTokenNet)
    return net


def _run(model: torch.nn.Module, *loras: LoraWeights) -> torch.Tensor:
    return model(ModuleSetBatch.from_loras(list(loras), dtype=torch.float64))


@pytest.mark.parametrize(
    ("name", "identity"),
    [
        ("model.layers.3.self_attn.q_proj", ModuleIdentity("self_attn.q_proj", "model.layers.#", (3,))),
        ("transformer.h.11.attn.c_attn", ModuleIdentity("attn.c_attn", "transformer.h.#", (11,))),
        ("encoder.layer.2.attention.self.query", ModuleIdentity("attention.self.query", "encoder.layer.#", (2,))),
        (
            "text_encoder.text_model.encoder.layers.5.mlp.fc1",
            ModuleIdentity("mlp.fc1", "text_encoder.text_model.encoder.layers.#", (5,)),
        ),
        (
            "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj",
            ModuleIdentity("ff.net.0.proj", "up_blocks.#.attentions.#.transformer_blocks.#", (2, 1, 0)),
        ),
        (
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
            ModuleIdentity("attn2.to_out.0", "mid_block.attentions.#.transformer_blocks.#", (0, 0)),
        ),
        (
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
            ModuleIdentity("attn1.to_q", "input_blocks.#.#.transformer_blocks.#", (4, 1, 0)),
        ),
        ("down_blocks.0.resnets.1.conv2", ModuleIdentity("conv2", "down_blocks.#.resnets.#", (0, 1))),
        ("fc2", ModuleIdentity("fc2", "", ())),
    ],
)
def test_module_identity(name: str, identity: ModuleIdentity) -> None:
    assert module_identity(name) == identity


def test_gl_invariant_and_sensitive_on_a_subset(model: ModuleTokenNet, gen: torch.Generator) -> None:
    lora = random_lora(SUBSET, generator=gen, scale=[0.7, 1.3, 2.0])
    fn = lambda x: _run(model, x)  # noqa: E731
    assert_gl_invariant(fn, lora, generator=gen, cond_max=10.0, rtol=1e-7, atol=1e-9)
    assert_gl_sensitive(fn, lora, generator=gen)


def test_rank_padding_and_alpha_b_rescaling_keep_the_output(model: ModuleTokenNet, gen: torch.Generator) -> None:
    lora = random_lora(SUBSET, generator=gen)

    def padded(m: LoraModule) -> LoraModule:  # zero rows of A, zero columns of B: the same ΔW at rank r + 3
        a = torch.cat([m.a, torch.zeros(3, m.spec.d_in, dtype=m.a.dtype)])
        b = torch.cat([m.b, torch.zeros(m.spec.d_out, 3, dtype=m.b.dtype)], dim=1)
        return replace(m, spec=replace(m.spec, rank=m.spec.rank + 3), a=a, b=b)

    def rescaled(m: LoraModule) -> LoraModule:  # α × 4 and B / 4: scale·B·A unchanged
        return replace(m, b=m.b / 4, scale=m.scale * 4, alpha=m.alpha * 4)

    want = _run(model, lora)
    torch.testing.assert_close(_run(model, lora.map_modules(padded)), want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(_run(model, lora.map_modules(rescaled)), want, rtol=1e-9, atol=1e-11)
    shrunk = lora.map_modules(lambda m: replace(m, b=m.b / 4))  # negative control: ΔW / 4 is a real change
    assert not torch.allclose(_run(model, shrunk), want, rtol=1e-3)


def test_a_zero_module_is_an_absent_module(model: ModuleTokenNet, gen: torch.Generator) -> None:
    lora = random_lora(SUBSET, generator=gen)
    extra = _layer(1, "q_proj")
    with_b_zero = LoraWeights(
        (
            *lora.modules,
            LoraModule(extra, torch.randn(3, 12, dtype=torch.float64), torch.zeros(12, 3, dtype=torch.float64), 1.0),
        )
    )
    with_a_zero = LoraWeights(
        (
            *lora.modules,
            LoraModule(extra, torch.zeros(3, 12, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64), 1.0),
        )
    )
    out = _run(model, lora, with_b_zero, with_a_zero)  # one batch: the same masked tokens, the same computation
    assert torch.equal(out[1], out[0]) and torch.equal(out[2], out[0])
    torch.testing.assert_close(_run(model, with_b_zero)[0], _run(model, lora)[0], rtol=1e-10, atol=1e-12)
    tiny = LoraWeights(
        (
            *lora.modules,
            LoraModule(
                extra, torch.randn(3, 12, dtype=torch.float64), 1e-3 * torch.randn(12, 3, dtype=torch.float64), 1.0
            ),
        )
    )
    assert not torch.allclose(_run(model, tiny)[0], out[0], rtol=1e-6)  # a small but nonzero module is read


def test_any_subset_and_unknown_modules(model: ModuleTokenNet, gen: torch.Generator) -> None:
    deeper = LayerSpec("model.layers.7.self_attn.q_proj", 12, 12, 2)  # a layer it never saw, of a role it saw
    unknown_role = LayerSpec("model.layers.0.self_attn.k_proj", 12, 12, 2)
    other_shape = LayerSpec("model.layers.1.self_attn.q_proj", 24, 12, 2)
    spec = LoraSpec((SUBSET.layers[0], deeper, unknown_role, other_shape))
    used, ignored = model.usable(spec)
    assert used == [SUBSET.layers[0].name, deeper.name]
    assert ignored == [unknown_role.name, other_shape.name]
    lora = random_lora(spec, generator=gen)
    known_only = LoraWeights(tuple(m for m in lora if m.name in used))
    torch.testing.assert_close(_run(model, lora), _run(model, known_only), rtol=1e-10, atol=1e-12)
    deeper_only = LoraWeights((lora[deeper.name],))
    assert torch.isfinite(_run(model, deeper_only)).all()
    assert model.usable(LoraSpec((unknown_role, other_shape)))[0] == []


def test_a_loras_output_does_not_depend_on_the_batch(model: ModuleTokenNet, gen: torch.Generator) -> None:
    specs = [SUBSET, VOCAB, LoraSpec(VOCAB.layers[:1]), LoraSpec(tuple(replace(x, rank=6) for x in VOCAB.layers[3:]))]
    loras = [random_lora(s, generator=gen) for s in specs]
    batched = _run(model, *loras)
    single = torch.cat([_run(model, x) for x in loras])
    torch.testing.assert_close(batched, single, rtol=1e-8, atol=1e-10)
    same_layout = [random_lora(VOCAB, generator=gen) for _ in range(3)]
    torch.testing.assert_close(  # a LoraBatch is read as the module set it is
        model(LoraBatch.from_loras(same_layout, dtype=torch.float64)), _run(model, *same_layout)
    )


def test_module_set_batch(gen: torch.Generator) -> None:
    x = random_lora(SUBSET, generator=gen, scale=[2.0, 0.5, -1.0])
    y = random_lora(LoraSpec(VOCAB.layers[:2]), generator=gen)
    batch = ModuleSetBatch.from_loras([x, y], dtype=torch.float64)
    assert batch.spec.ranks == (4,) * 4 and len(batch) == 2
    assert batch.spec.names == (
        VOCAB.layers[0].name,
        VOCAB.layers[1].name,
        SUBSET.layers[2].name,
        SUBSET.layers[1].name,
    )
    assert batch.present.tolist() == [[True, False, True, True], [True, True, False, False]]
    a, b = batch.scaled()
    for j, name in enumerate(batch.spec.names):  # ΔW per module, zero where absent
        for i, lora in enumerate((x, y)):
            want = lora[name].delta_weight() if name in lora.spec.names else torch.zeros(b[j].shape[1], a[j].shape[2])
            torch.testing.assert_close(b[j][i] @ a[j][i], want.to(torch.float64))
    raw = ModuleSetBatch.from_loras([x, y], dtype=torch.float64, fold_scale=False)
    torch.testing.assert_close(raw.scaled()[1][0] @ raw.scaled()[0][0], b[0] @ a[0])
    moved = batch.to(torch.float32)
    assert moved.a[0].dtype == torch.float32 and moved.present.dtype == torch.bool
    assert moved.a[0].device == moved.present.device == x.modules[0].a.device
    sub = batch.index(torch.tensor([1]))
    assert sub.present.tolist() == [[True, True, False, False]] and sub.spec == batch.spec
    wrong = random_lora(LoraSpec((LayerSpec(VOCAB.layers[0].name, 5, 12, 3),)), generator=gen)
    with pytest.raises(SpecMismatchError, match="is 12×12 in one LoRA and 5×12 in another"):
        ModuleSetBatch.from_loras([x, wrong])


def test_save_load_and_predictor_accepts_subsets(model: ModuleTokenNet, gen: torch.Generator, tmp_path: Path) -> None:
    task = Task("score", "regression", 1, ("score",), mean=0.5, std=2.0)
    net = build_model("module_tokens", VOCAB, 1, CONFIG).eval()
    folder = save_predictor(tmp_path / "p", net, task, "module_tokens", True)
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == "module_tokens" and [s["name"] for s in config["spec"]] == list(VOCAB.names)
    assert config["vocabulary"]["roles"] == ["mlp.up_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert config["vocabulary"]["blocks"] == {"model.layers.#": [2]}
    predictor = load_predictor(folder)
    subset = random_lora(SUBSET, generator=gen, dtype=torch.float32)
    strangers = random_lora(LoraSpec((LayerSpec("model.layers.0.self_attn.k_proj", 12, 12, 2),)), generator=gen)
    assert predictor.fits(subset) and not predictor.fits(strangers)
    with_stranger = LoraWeights((*subset.modules, *strangers.modules))
    assert predictor.module_coverage(with_stranger) == (list(SUBSET.names), list(strangers.spec.names))
    with torch.no_grad():
        want = net(ModuleSetBatch.from_loras([subset]))[0, 0] * task.std + task.mean
    got = predictor.predict_and_embed_many([subset, with_stranger])
    assert got[0][0].value == pytest.approx(float(want), rel=1e-5)
    assert got[1][0].value == pytest.approx(float(want), rel=1e-5)  # the unknown module is ignored
    with pytest.raises(SpecMismatchError, match="none of its 1 module"):
        predictor.predict(strangers)


def test_trains_on_loras_of_different_layouts(gen: torch.Generator) -> None:
    """One model learns from LoRAs with different modules and ranks; the target (log ‖ΔW‖ of the q modules it
    has) is learnable, so a few epochs beat the mean on a held-out split."""
    layouts = [
        VOCAB,
        SUBSET,
        LoraSpec(VOCAB.layers[::2]),
        LoraSpec(tuple(replace(x, rank=5) for x in VOCAB.layers[:4])),
    ]
    loras, rows = [], []
    for i in range(96):
        lora = random_lora(layouts[i % 4], generator=gen, dtype=torch.float32, scale=float(np.exp(i % 7 / 3)))
        y = float(sum(torch.log(m.delta_weight().norm()) for m in lora))
        loras.append(lora)
        rows.append({"split": ("train", "train", "val", "test")[i % 8 // 2], "y_score": y})
    zoo = LoadedZoo(Path("mixed"), rows, loras)
    model, _, result = train_on_zoo(zoo, "score", "module_tokens", CONFIG, TrainConfig(epochs=25, batch=16))
    assert set(model.spec.names) == set(VOCAB.names)  # the union of the training layouts
    assert result["test"]["r2"] > 0.5
