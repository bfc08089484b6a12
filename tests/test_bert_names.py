"""One BERT encoder, every common tool's adapter of it: the same canonical module names, the factors the tool saved.

The canonical names are those of plain ``peft.get_peft_model(BertModel(...), ...)`` (``encoder.layer.N.…``). Adapters
are written in tmp dirs by peft and sentence-transformers themselves, on a tiny BERT built from a config with a
WordPiece vocabulary written here (no downloads), and read back with :func:`lol_engine.load_lora`.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lol_engine import LoraFormatError, load_lora  # noqa: E402
from lol_engine.lora.family import detect_family  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]  # "dense" also hits attention.output, intermediate, output and the pooler
CANONICAL = {
    f"encoder.layer.{i}.{m}"
    for i in range(2)
    for m in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
} | {"pooler.dense"}


def _bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )


def _lora_config(**extra: object) -> peft.LoraConfig:
    # init_lora_weights=False makes B random, so ΔW ≠ 0; alpha/r = 2
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **extra)


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module path in model: peft LoRA layer}``."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _merge_deltas(base: dict[str, torch.Tensor], wrapped: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """ΔW per canonical name from peft's own merge, done in float64 on a copy of the saved (float32) adapter.

    ``base`` holds the weights before wrapping; ``prefix`` is where the tool put the BertModel.
    """
    after = copy.deepcopy(wrapped).double().merge_and_unload().state_dict()
    before = {k: v.double() for k, v in base.items() if k.endswith(".weight") and k in after}
    return {
        k.removesuffix(".weight").removeprefix(prefix): after[k] - v
        for k, v in before.items()
        if not torch.equal(after[k], v)
    }


@dataclass(frozen=True)
class Written:
    """What a tool wrote, as the tool itself knows it."""

    prefix: str  # where the tool put the BertModel, e.g. "bert."
    layers: dict[str, nn.Module]  # {module path below base_model.model: peft LoRA layer}
    deltas: dict[str, torch.Tensor]  # {canonical name: ΔW from the tool's own merge}


def _check(folder: Path, written: Written) -> None:
    """Exact names, factors and scale as the tool saved them; ΔW equal to the tool's own merge."""
    prefix, layers, deltas = written.prefix, written.layers, written.deltas
    lora = load_lora(folder)
    assert set(lora.names) == CANONICAL
    assert lora.meta.format == "peft"
    assert lora.meta.base_family == "bert-encoder"
    assert {path.removeprefix(prefix) for path in layers} == CANONICAL  # the tool's own LoRA layers
    for path, layer in layers.items():
        module = lora[path.removeprefix(prefix)]
        assert torch.equal(module.a, layer.lora_A["default"].weight.detach())  # A: (r, d_in)
        assert torch.equal(module.b, layer.lora_B["default"].weight.detach())  # B: (d_out, r)
        assert module.scale == layer.scaling["default"] == 8 / 4
    assert set(deltas) == CANONICAL
    for module in lora.to(torch.float64):
        torch.testing.assert_close(module.delta_weight(), deltas[module.name], rtol=1e-10, atol=1e-12)


# --- the tools ------------------------------------------------------------------------------------------------------


def _peft_bert_model(folder: Path, tmp: Path) -> Written:
    """Plain peft on a BertModel: the canonical layout."""
    torch.manual_seed(0)
    model = transformers.BertModel(_bert_config())
    return _peft_on(model, folder, prefix="")


def _peft_bert_head(folder: Path, tmp: Path) -> Written:
    """peft on BertForSequenceClassification (task SEQ_CLS): keys ``base_model.model.bert.encoder.…``."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_config())
    return _peft_on(model, folder, prefix="bert.", task_type="SEQ_CLS")


def _peft_on(model: nn.Module, folder: Path, prefix: str, **extra: object) -> Written:
    base = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peft.get_peft_model(model, _lora_config(**extra))
    wrapped.save_pretrained(str(folder))
    layers = {k.removeprefix("base_model.model."): v for k, v in _lora_layers(wrapped).items()}
    return Written(prefix, layers, _merge_deltas(base, wrapped, prefix))


def _sentence_transformer(tmp: Path) -> nn.Module:
    """A tiny SentenceTransformer (Transformer + mean Pooling) from a local BertModel and WordPiece tokenizer."""
    st = pytest.importorskip("sentence_transformers")
    base = tmp / "tiny-minilm"
    base.mkdir(exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"w{i}" for i in range(100 - len(vocab))]
    (base / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(base / "vocab.txt")).save_pretrained(str(base))
    torch.manual_seed(0)
    transformers.BertModel(_bert_config()).save_pretrained(str(base))
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer  # >= 6
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer  # < 6
    with contextlib.chdir(tmp):  # adapter_config's base_model_name_or_path is "tiny-minilm", not a path to tmp
        module = Transformer(base.name)
    pooling = Pooling(module.get_word_embedding_dimension())
    return st.SentenceTransformer(modules=[module, pooling], device="cpu")


def _auto_model_attribute(model: nn.Module) -> str:
    """The attribute of the Transformer module that holds the BertModel: ``auto_model`` (< 6) or ``model`` (>= 6)."""
    return next(name for name, child in model[0].named_children() if child is model[0].auto_model)


def _st_peft_auto_model(folder: Path, tmp: Path) -> Written:
    """peft on ``model[0].auto_model``, saved by ``SentenceTransformer.save``: the adapter sits beside modules.json."""
    model = _sentence_transformer(tmp)
    attribute = _auto_model_attribute(model)
    bert = model[0].auto_model
    base = {k: v.clone() for k, v in bert.state_dict().items()}
    torch.manual_seed(1)
    setattr(model[0], attribute, peft.get_peft_model(bert, _lora_config()))
    with contextlib.chdir(tmp):  # where peft finds "tiny-minilm" to check the vocabulary is unchanged
        model.save(str(folder))
    assert (folder / "modules.json").is_file()
    wrapped = getattr(model[0], attribute)
    layers = {k.removeprefix("base_model.model."): v for k, v in _lora_layers(wrapped).items()}
    return Written("", layers, _merge_deltas(base, wrapped, ""))


def _st_peft_whole(folder: Path, tmp: Path) -> Written:
    """peft on the whole SentenceTransformer: keys ``base_model.model.0.model.encoder.…`` (``0.auto_model.`` < 6)."""
    model = _sentence_transformer(tmp)
    prefix = f"0.{_auto_model_attribute(model)}."
    torch.manual_seed(2)
    return _peft_on(model, folder, prefix=prefix)


def _st_peft_transformer_module(folder: Path, tmp: Path) -> Written:
    """peft on ``model[0]``, the Transformer module: ``base_model.model.model.encoder.…`` (``auto_model.`` < 6)."""
    model = _sentence_transformer(tmp)
    prefix = f"{_auto_model_attribute(model)}."
    torch.manual_seed(3)
    return _peft_on(model[0], folder, prefix=prefix)


def _st_add_adapter(folder: Path, tmp: Path) -> Written:
    """sentence-transformers' own ``add_adapter`` and ``save``; transformers writes ``base_model.model.`` keys."""
    model = _sentence_transformer(tmp)
    torch.manual_seed(4)
    try:
        model.add_adapter(_lora_config())
    except ValueError as exc:  # transformers' check of the installed peft version
        if "version of PEFT" in str(exc):
            pytest.skip(f"sentence-transformers add_adapter refuses the installed peft {peft.__version__}: {exc}")
        raise
    model.save(str(folder))
    layers = _lora_layers(model[0].auto_model)
    deltas = {  # transformers has no merge: peft's own get_delta_weight, in float64
        path: copy.deepcopy(layer).double().get_delta_weight("default").detach() for path, layer in layers.items()
    }
    return Written("", layers, deltas)


TOOLS: dict[str, Callable[[Path, Path], Written]] = {
    "peft-BertModel": _peft_bert_model,
    "peft-BertForSequenceClassification": _peft_bert_head,
    "st-peft-auto_model": _st_peft_auto_model,
    "st-peft-whole": _st_peft_whole,
    "st-peft-Transformer-module": _st_peft_transformer_module,
    "st-add_adapter": _st_add_adapter,
}


@pytest.mark.parametrize("tool", list(TOOLS))
def test_tool_adapter_has_canonical_names_and_its_factors(tool: str, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    written = TOOLS[tool](folder, tmp_path)
    _check(folder, written)
    evidence = load_lora(folder).meta.family_evidence
    if written.prefix:
        assert any(f"wrapper prefix {written.prefix!r} resolved" in line for line in evidence), evidence
    else:
        assert not any("wrapper prefix" in line for line in evidence), evidence


def test_all_tools_name_the_same_modules(tmp_path: Path) -> None:
    names = {}
    for tool, write in TOOLS.items():
        if tool == "st-add_adapter":
            continue  # may be skipped with the installed peft; covered above
        folder = tmp_path / tool
        write(folder, tmp_path)
        names[tool] = load_lora(folder).names
    assert len(set(names.values())) == 1, names
    assert set(next(iter(names.values()))) == CANONICAL


@pytest.mark.parametrize("tool", ["peft-BertForSequenceClassification", "st-peft-whole", "st-peft-Transformer-module"])
def test_family_from_structure_and_from_metadata(tool: str, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    TOOLS[tool](folder, tmp_path)
    lora = load_lora(folder)
    family, evidence, warnings = detect_family(lora.spec.layers, {}, {}, {})  # module names alone
    assert family == "bert-encoder", evidence
    assert warnings == []
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "sentence-transformers/all-MiniLM-L6-v2"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    meta = load_lora(folder).meta
    assert meta.base_family == "bert-encoder"
    assert meta.family_evidence[0] == "adapter_config base_model_name_or_path=sentence-transformers/all-minilm-l6-v2"
    assert not [w for w in meta.warnings if "metadata says" in w]


def test_rank_and_alpha_patterns_match_the_wrapped_names(tmp_path: Path) -> None:
    """PEFT matches pattern keys against ``bert.encoder.…``: the scale must follow the key as PEFT matched it."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_config())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = _lora_config(
        rank_pattern={"bert.encoder.layer.1.attention.self.query": 2},
        alpha_pattern={r"^bert\.encoder\.layer\.0\.output\.dense": 16},
    )
    wrapped = peft.get_peft_model(model, config)
    wrapped.save_pretrained(str(tmp_path))
    deltas = _merge_deltas(base, wrapped, "bert.")
    lora = load_lora(tmp_path)
    assert lora["encoder.layer.1.attention.self.query"].spec.rank == 2
    assert lora["encoder.layer.1.attention.self.query"].scale == 8 / 2
    assert lora["encoder.layer.0.output.dense"].scale == 16 / 4
    assert lora["encoder.layer.1.output.dense"].scale == 8 / 4
    for module in lora.to(torch.float64):
        torch.testing.assert_close(module.delta_weight(), deltas[module.name], rtol=1e-10, atol=1e-12)


# --- other architectures keep their names ---------------------------------------------------------------------------


def test_bart_layers_are_not_rewritten(tmp_path: Path) -> None:
    """BART's ``model.encoder.layers.N`` under a ``model.`` attribute is no BERT encoder: nothing is stripped."""
    config = transformers.BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    lora_config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"], init_lora_weights=False)
    peft.get_peft_model(transformers.BartForConditionalGeneration(config), lora_config).save_pretrained(str(tmp_path))
    lora = load_lora(tmp_path)
    assert set(lora.names) == {
        "model.encoder.layers.0.self_attn.q_proj",
        "model.encoder.layers.0.fc1",
        "model.decoder.layers.0.self_attn.q_proj",
        "model.decoder.layers.0.encoder_attn.q_proj",
        "model.decoder.layers.0.fc1",
    }
    assert not any("wrapper prefix" in line for line in lora.meta.family_evidence)


def _mobilenet() -> nn.Module:
    from lol_engine.zoo.mobilenet import MobileNetV2

    torch.manual_seed(0)
    return MobileNetV2(num_classes=10)


def test_mobilenet_v2_keeps_torchvision_names(tmp_path: Path) -> None:
    """peft on torchvision-named MobileNetV2: ``features.N.conv.…`` and ``classifier.1``, conv factors flattened."""
    targets = ["features.2.conv.0.0", "features.2.conv.2", "features.18.0", "classifier.1"]
    model = _mobilenet()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    wrapped = peft.get_peft_model(model, lora_config)
    wrapped.save_pretrained(str(tmp_path))
    deltas = _merge_deltas(base, wrapped, "")
    lora = load_lora(tmp_path)
    assert lora.names == ("classifier.1", "features.2.conv.0.0", "features.2.conv.2", "features.18.0")
    assert lora["features.2.conv.0.0"].a.shape == (4, 16)  # (r, c_in · 1 · 1)
    for module in lora.to(torch.float64):
        torch.testing.assert_close(module.delta_weight(reshape=True), deltas[module.name], rtol=1e-10, atol=1e-12)


def test_mobilenet_v2_under_a_user_attribute_is_kept_as_written(tmp_path: Path) -> None:
    """A user's ``self.model = MobileNetV2()`` (Lightning style) is no tool's fixed wrapper: no prefix is guessed."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = _mobilenet()

    target = ["model.features.2.conv.2"]
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False)
    peft.get_peft_model(Wrapper(), lora_config).save_pretrained(str(tmp_path))
    assert load_lora(tmp_path).names == ("model.features.2.conv.2",)


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1")
def test_mobilenet_v2_depthwise_conv_lora_is_refused_clearly(tmp_path: Path) -> None:
    """peft 0.21 puts a full conv A beside a grouped B on a depthwise conv; its update is no ΔW of that layer."""
    lora_config = peft.LoraConfig(r=96, lora_alpha=8, target_modules=["features.2.conv.1.0"], init_lora_weights=False)
    peft.get_peft_model(_mobilenet(), lora_config).save_pretrained(str(tmp_path))  # groups = 96 divides r
    with pytest.raises(LoraFormatError, match="grouped"):
        load_lora(tmp_path)
