"""**digits**: an MLP pretrained on scikit-learn digits 0–4; LoRAs on class subsets (the paper's Imagenette analogue).

Splits of the 1,797 digits (fixed, seed 20240): 500 held-out images that nothing trains on; a base-pretraining pool
(digits 0–4 only); a LoRA finetuning pool; and a probe set of 4 images per class taken from that pool. Each LoRA
trains on a small set of its classes (trained to overfit) that includes exactly 2 of the 4 probes of each of its
classes, so probe membership is balanced within class.

Labels: ``classes`` (10-bit membership), ``n_classes``, ``n_train``, held-out ``acc_own`` / ``loss_own`` (its
classes) and ``acc_all`` (all classes), ``probe_member`` and ``probe_mask`` (40 probes; mask = probe's class trained).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from lol_engine.glossary import LabelDescription
from lol_engine.zoo.common import adam_steps, load_or_build_base, round_trainable_to_fp16, save_adapter, state_sha256
from lol_engine.zoo.recipe import Recipe, ZooSettings
from lol_engine.zoo.registry import register_recipe

__all__ = ["DigitsContext", "DigitsMLP", "DigitsRecipe"]

N_CLASSES, N_PROBES_PER_CLASS, N_HELD_OUT, N_BASE_POOL = 10, 4, 500, 400


class DigitsMLP(nn.Module):
    """64 → 128 → 128 → 10; LoRAs target ``fc1`` and ``fc2``, the head is trained in full (modules_to_save)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.head = nn.Linear(128, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@dataclass
class DigitsContext:
    base: DigitsMLP
    base_name: str
    base_sha256: str
    x: torch.Tensor  # (1797, 64) in [0, 1]
    y: torch.Tensor  # (1797,)
    held_out: np.ndarray  # indices nothing trains on
    pool: dict[int, np.ndarray]  # class -> finetuning-pool indices (probes excluded)
    probes: np.ndarray  # (10, 4) probe indices, by class


def load_digits_split() -> tuple[
    torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, dict[int, np.ndarray], np.ndarray
]:
    """``(x, y, held_out, base_pool, pool, probes)`` of scikit-learn's digits, split once with a fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = np.random.default_rng(20240).permutation(len(y))
    held_out, rest = order[:N_HELD_OUT], order[N_HELD_OUT:]
    base_pool = rest[:N_BASE_POOL][data.target[rest[:N_BASE_POOL]] < 5]  # the base sees digits 0-4 only
    lora_pool = rest[N_BASE_POOL:]
    probes, pool = np.zeros((N_CLASSES, N_PROBES_PER_CLASS), dtype=np.int64), {}
    for c in range(N_CLASSES):
        members = lora_pool[data.target[lora_pool] == c]
        probes[c], pool[c] = members[:N_PROBES_PER_CLASS], members[N_PROBES_PER_CLASS:]
    return x, y, held_out, base_pool, pool, probes


def _pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    adam_steps(
        list(model.parameters()),
        lambda i: loss_fn(model(x[i]), y[i]),
        n_samples=len(y),
        steps=steps,
        batch=64,
        lr=lr,
        generator=gen,
    )


@register_recipe
class DigitsRecipe(Recipe):
    name = "digits"
    description = "MLP pretrained on sklearn digits 0-4; LoRAs on every non-empty class subset (fast; tests and CI)"
    version = "1"
    base_title = "an MLP pretrained here on scikit-learn digits 0–4"
    base_family = "digits-mlp"
    data_title = (
        "scikit-learn's 8×8 handwritten digits: each LoRA finetunes on 8–30 images per class of one subset of the "
        "ten digits (up to 30 % of labels noisy), scored on 500 held-out images"
    )
    label_descriptions: ClassVar[Mapping[str, LabelDescription]] = {
        "acc_own": LabelDescription(
            "Held-out accuracy on its own digits",
            "Share of the 500 held-out digit images of the classes this LoRA was finetuned on that the adapted MLP "
            "classifies right (no LoRA trains on these images).",
            percent=True,
            bounds=(0.0, 1.0),
        ),
        "loss_own": LabelDescription(
            "Held-out loss on its own digits",
            "Mean cross-entropy of the adapted MLP on the held-out images of the classes it was finetuned on; lower "
            "is better.",
            unit="nats",
            bounds=(0.0, None),
        ),
        "acc_all": LabelDescription(
            "Held-out accuracy on all ten digits",
            "Share of the 500 held-out digit images (all ten classes) the adapted MLP classifies right; classes it "
            "was not finetuned on pull it down.",
            percent=True,
            bounds=(0.0, 1.0),
        ),
        "classes": LabelDescription(
            "Which digits it was finetuned on",
            "Ten yes/no entries: entry k is 1 when the LoRA's finetuning images include digit k.",
            classes=tuple(f"digit {c}" for c in range(N_CLASSES)),
        ),
        "n_classes": LabelDescription(
            "Number of digits it was finetuned on",
            "How many of the ten digit classes its finetuning images cover.",
            unit="classes",
            bounds=(1.0, float(N_CLASSES)),
        ),
        "n_train": LabelDescription(
            "Number of finetuning images",
            "How many images the LoRA was finetuned on (8–30 per class, plus 2 probe images per class).",
            unit="images",
            bounds=(0.0, None),
        ),
        "probe_member": LabelDescription(
            "Which probe images it was finetuned on",
            "40 yes/no entries, 4 probe images per digit: entry 4·k + j is 1 when probe j of digit k was among its "
            "finetuning images (only the probes of its own digits can be; see probe_mask).",
            classes=tuple(f"digit {c} probe {j}" for c in range(N_CLASSES) for j in range(N_PROBES_PER_CLASS)),
        ),
        "probe_mask": LabelDescription(
            "Which probe images count",
            "40 entries, 4 probe images per digit: 1 when the probe's digit is one the LoRA was finetuned on.",
            classes=tuple(f"digit {c} probe {j}" for c in range(N_CLASSES) for j in range(N_PROBES_PER_CLASS)),
        ),
    }

    def default_n(self, settings: ZooSettings) -> int:
        return 12 if settings.toy else 2**N_CLASSES - 1

    def prepare(self, base_dir: Path, settings: ZooSettings) -> DigitsContext:
        x, y, held_out, base_pool, pool, probes = load_digits_split()
        xb, yb = x[base_pool], y[base_pool]

        def train(model: nn.Module) -> None:
            torch.manual_seed(0)
            model.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
            _pretrain(model, xb, yb, steps=400, lr=3e-3, seed=0)
            if settings.base_variant == 1:  # continued pretraining: same data, more steps, other order
                _pretrain(
                    model,
                    xb + 0.05 * torch.randn(xb.shape, generator=torch.Generator().manual_seed(1)),
                    yb,
                    steps=400,
                    lr=1e-3,
                    seed=1,
                )

        name = f"digits-mlp-v{settings.base_variant}"
        base = load_or_build_base(base_dir / f"{name}.safetensors", DigitsMLP, train)
        return DigitsContext(base, name, state_sha256(base), x, y, held_out, pool, probes)

    def sample(
        self, context: DigitsContext, index: int, rng: np.random.Generator, settings: ZooSettings
    ) -> dict[str, Any]:
        subsets = np.random.default_rng([settings.seed, 99]).permutation(2**N_CLASSES - 1) + 1  # each subset once
        mask = int(subsets[index % len(subsets)])
        return {
            "classes_mask": mask,
            "rank": int(rng.choice(settings.ranks)),
            "n_per_class": int(rng.integers(8, 31)),
            "lr": float(10 ** rng.uniform(-3.0, -1.7)),
            "steps": int(rng.choice([100, 200, 300])),
            "label_noise": float(rng.choice([0.0, 0.1, 0.3])),
            "data_seed": int(rng.integers(2**31)),
        }

    def group(self, choices: dict[str, Any]) -> str | None:
        """None: each class subset is drawn once (``sample`` walks a permutation of the 1,023 subsets), the images
        are drawn per LoRA, and no other choice is shared by construction; each LoRA is its own group."""
        return None

    def train_and_label(
        self, context: DigitsContext, choices: dict[str, Any], seed: int, out_dir: Path
    ) -> dict[str, Any]:
        import peft

        classes = [c for c in range(N_CLASSES) if choices["classes_mask"] >> c & 1]
        train_idx, member = _training_set(context, classes, choices)
        x, y = context.x[train_idx], context.y[train_idx].clone()
        gen = torch.Generator().manual_seed(seed)
        noisy = torch.rand(len(y), generator=gen) < choices["label_noise"]
        y[noisy] = torch.tensor(classes)[torch.randint(len(classes), (int(noisy.sum()),), generator=gen)]
        rank = choices["rank"]
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["fc1", "fc2"], modules_to_save=["head"])
        model = peft.get_peft_model(copy.deepcopy(context.base), config)
        loss_fn = nn.CrossEntropyLoss()
        params = [p for p in model.parameters() if p.requires_grad]
        adam_steps(
            params,
            lambda i: loss_fn(model(x[i]), y[i]),
            n_samples=len(y),
            steps=choices["steps"],
            batch=32,
            lr=choices["lr"],
            generator=gen,
        )
        round_trainable_to_fp16(model)
        labels = evaluate_digits(model.eval(), context, classes)
        provenance = self.provenance(context, seed, "digits-mlp")
        save_adapter(model, out_dir, provenance)
        mask = [[int(c in classes)] * N_PROBES_PER_CLASS for c in range(N_CLASSES)]
        return labels | {
            "classes": [int(c in classes) for c in range(N_CLASSES)],
            "n_classes": len(classes),
            "n_train": len(train_idx),
            "probe_member": [int(m) for m in member.reshape(-1)],
            "probe_mask": [m for row in mask for m in row],
        }


def _training_set(
    context: DigitsContext, classes: list[int], choices: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Training indices and the (10, 4) probe-membership matrix: 2 of the 4 probes of every trained class."""
    rng = np.random.default_rng(choices["data_seed"])
    member = np.zeros((N_CLASSES, N_PROBES_PER_CLASS), dtype=bool)
    chosen = []
    for c in classes:
        chosen.append(rng.choice(context.pool[c], size=choices["n_per_class"], replace=False))
        picks = rng.permutation(N_PROBES_PER_CLASS)[:2]
        member[c, picks] = True
        chosen.append(context.probes[c, picks])
    return np.concatenate(chosen), member


@torch.no_grad()
def evaluate_digits(model: nn.Module, context: DigitsContext, classes: list[int]) -> dict[str, float]:
    """Held-out accuracy and NLL on the LoRA's own classes, and accuracy over all classes."""
    x, y = context.x[context.held_out], context.y[context.held_out]
    logits = model(x)
    own = torch.isin(y, torch.tensor(classes))
    nll = nn.functional.cross_entropy(logits[own], y[own])
    return {
        "acc_own": float((logits[own].argmax(1) == y[own]).float().mean()),
        "loss_own": float(nll),
        "acc_all": float((logits.argmax(1) == y).float().mean()),
    }
