"""**fashion-gen**: a conditional VAE pretrained on Fashion-MNIST; LoRAs finetuned on 21 images of one "identity".

The analogue of the paper's CelebA-LoRA set (DreamBooth on 21 images of one celebrity, scored by CLIP):

* splits of Fashion-MNIST's 60k training images (fixed, seed 0): 30k pretrain the VAE, 10k train the judge, 20k are
  clustered by k-means (20 clusters per class) into *identities* of ≥ 21 images;
* a prompt-like condition enters the decoder: 0 "top", 1 "shoe", 2 "other" (the coarse group the base was
  pretrained with) and 3 "sks" (a token the base never saw), so a LoRA's prompt may or may not fit its identity;
* each LoRA (targets ``e1``, ``d1``, ``d2``) trains on its identity's 21 images with lr, steps and prompt from the
  paper's grid;
* labels: the identity's class, majority-vote image attributes over its 21 images (``bold``, ``wide``,
  ``top_heavy``, thresholds fixed on the pretraining split), and a **quality score**: the fixed judge's mean
  probability of the identity's class on 33 images generated from fixed latents (seed 42). That evaluation,
  :func:`evaluate_quality`, is what LoL predictions replace; its time is recorded per LoRA (``t_quality_eval``).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lol_engine.glossary import LabelDescription
from lol_engine.zoo.common import adam_steps, load_or_build_base, round_trainable_to_fp16, save_adapter, state_sha256
from lol_engine.zoo.datasets import FASHION_CLASSES
from lol_engine.zoo.recipe import Recipe, ZooSettings
from lol_engine.zoo.registry import register_recipe

__all__ = ["FashionContext", "FashionGenRecipe", "FashionVAE", "evaluate_quality", "image_attributes"]

LATENT, PROMPTS, N_IMAGES, N_SAMPLES = 16, 4, 21, 33
PROMPT_NAMES = ("top", "shoe", "other", "sks")
GROUP_OF_CLASS = (
    0,
    2,
    0,
    2,
    0,
    1,
    0,
    1,
    2,
    1,
)  # T-shirt, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Boot


class FashionVAE(nn.Module):
    """784 → 400 → 16 (μ, log σ²); decoder (z ⊕ one-hot prompt) → 400 → 784. LoRAs target e1, d1, d2."""

    def __init__(self) -> None:
        super().__init__()
        self.e1 = nn.Linear(784, 400)
        self.mu = nn.Linear(400, LATENT)
        self.logvar = nn.Linear(400, LATENT)
        self.d1 = nn.Linear(LATENT + PROMPTS, 400)
        self.d2 = nn.Linear(400, 784)

    def decode(self, z: Tensor, prompt: Tensor) -> Tensor:
        """Logits of the 784 pixels for latents ``z: (N, 16)`` and prompt ids ``prompt: (N,)``."""
        cond = nn.functional.one_hot(prompt, PROMPTS).to(z.dtype)
        return self.d2(torch.relu(self.d1(torch.cat([z, cond], dim=1))))

    def forward(self, x: Tensor, prompt: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The negative ELBO per image (summed BCE + KL), averaged over the batch."""
        h = torch.relu(self.e1(x))
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn(mu.shape, generator=generator) * torch.exp(0.5 * logvar)
        recon = nn.functional.binary_cross_entropy_with_logits(self.decode(z, prompt), x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (recon + kl) / len(x)


@dataclass
class FashionContext:
    base: FashionVAE
    base_name: str
    base_sha256: str
    judge: nn.Linear
    identities: list[dict[str, Any]]  # {"class": c, "images": [indices into train]}
    x: Tensor  # (60000, 784) in [0, 1]
    thresholds: dict[str, float]


def image_attributes(x: Tensor) -> dict[str, Tensor]:
    """Per-image measurements behind the attributes: ink, width of the inked columns, share of ink in the top half."""
    img = x.reshape(-1, 28, 28)
    ink = img.mean((1, 2))
    cols = (img > 0.3).any(1).float()  # (N, 28) columns with ink
    width = cols.sum(1)
    top = img[:, :14].sum((1, 2)) / img.sum((1, 2)).clamp_min(1e-6)
    return {"bold": ink, "wide": width, "top_heavy": top}


def _splits(toy: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(0).permutation(60000)
    sizes = (2000, 1000, 3000) if toy else (30000, 10000, 20000)
    a, b = sizes[0], sizes[0] + sizes[1]
    return order[:a], order[a:b], order[b : b + sizes[2]]


def _pretrain_vae(model: FashionVAE, x: Tensor, y: np.ndarray, epochs: int, seed: int, lr: float = 1e-3) -> None:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([GROUP_OF_CLASS[c] for c in y])  # the base learns prompts 0-2; "sks" (3) stays unseen
    steps = epochs * len(x) // 128
    adam_steps(
        list(model.parameters()),
        lambda i: model(x[i], prompt[i], gen),
        n_samples=len(x),
        steps=steps,
        batch=128,
        lr=lr,
        generator=gen,
    )


def _train_judge(judge: nn.Linear, x: Tensor, y: Tensor) -> None:
    gen = torch.Generator().manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    adam_steps(
        list(judge.parameters()),
        lambda i: loss_fn(judge(x[i]), y[i]),
        n_samples=len(x),
        steps=3000,
        batch=256,
        lr=3e-3,
        generator=gen,
        weight_decay=1e-4,
    )


def _identities(
    base_dir: Path, x: Tensor, y: np.ndarray, pool: np.ndarray, settings: ZooSettings
) -> list[dict[str, Any]]:
    path = base_dir / "identities.json"
    if path.exists():
        return json.loads(path.read_text())
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    out = []
    for c in range(10):
        members = pool[y[pool] == c]
        k = 4 if settings.toy else 20
        with threadpool_limits(settings.threads):  # k-means sums per thread: its last bits follow the thread count
            assignment = KMeans(n_clusters=k, n_init=3, random_state=c).fit_predict(x[members].numpy())
        for cluster in range(k):
            images = members[assignment == cluster]
            if len(images) >= N_IMAGES:
                out.append({"class": c, "images": sorted(int(i) for i in images)})
    base_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


@torch.no_grad()
def evaluate_quality(model: nn.Module, judge: nn.Linear, identity_class: int, prompt: int) -> float:
    """The standard evaluation LoL replaces: generate 33 images from fixed latents, score them with the judge.

    Returns the judge's mean probability of ``identity_class``. ``model`` is the adapted VAE (or a PeftModel of it).
    """
    z = torch.randn(N_SAMPLES, LATENT, generator=torch.Generator().manual_seed(42))
    vae: FashionVAE = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[assignment,operator]
    images = torch.sigmoid(vae.decode(z, torch.full((N_SAMPLES,), prompt)))
    return float(torch.softmax(judge(images), dim=1)[:, identity_class].mean())


@register_recipe
class FashionGenRecipe(Recipe):
    name = "fashion-gen"
    description = "conditional VAE on Fashion-MNIST; LoRAs on 21 images of one identity; judge-scored quality"
    version = "1"
    base_title = "a conditional VAE pretrained here on Fashion-MNIST"
    base_family = "fashion-vae"
    data_title = (
        "Fashion-MNIST: each LoRA finetunes the VAE on 21 images of one identity (a k-means cluster of one class) "
        "under a prompt token (top, shoe, other, or the unseen sks)"
    )
    label_descriptions: ClassVar[Mapping[str, LabelDescription]] = {
        "class": LabelDescription(
            "Fashion-MNIST class of what it was finetuned on",
            "The class of the 21 images of the LoRA's identity (its subject: a k-means cluster of one class).",
            classes=FASHION_CLASSES,
        ),
        "bold": LabelDescription(
            "Bold: finetuned on heavily inked images",
            "1 when more than half of its 21 finetuning images hold more ink (mean pixel intensity) than the median "
            "image of the VAE's pretraining split, else 0.",
            classes=("not bold", "bold"),
        ),
        "wide": LabelDescription(
            "Wide: finetuned on wide images",
            "1 when more than half of its 21 finetuning images have more inked columns than the median image of the "
            "VAE's pretraining split, else 0.",
            classes=("not wide", "wide"),
        ),
        "top_heavy": LabelDescription(
            "Top-heavy: finetuned on top-heavy images",
            "1 when more than half of its 21 finetuning images hold a larger share of their ink in the top half "
            "than the median image of the VAE's pretraining split, else 0.",
            classes=("not top-heavy", "top-heavy"),
        ),
        "quality": LabelDescription(
            "Generation quality (judge score)",
            "Mean probability a fixed Fashion-MNIST classifier (the judge) gives the identity's class on 33 images "
            "the adapted VAE generates from fixed latents under the LoRA's prompt: how recognisably it draws its "
            "subject.",
            percent=True,
            bounds=(0.0, 1.0),
        ),
    }

    def default_n(self, settings: ZooSettings) -> int:
        return 8 if settings.toy else 1000

    def prepare(self, base_dir: Path, settings: ZooSettings) -> FashionContext:
        from lol_engine.zoo.datasets import fashion_mnist

        images, labels = fashion_mnist("train")
        x = torch.tensor(images.reshape(-1, 784), dtype=torch.float32) / 255.0
        base_idx, judge_idx, pool = _splits(settings.toy)
        epochs = 1 if settings.toy else 5

        def train(model: FashionVAE) -> None:
            torch.manual_seed(0)
            model.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
            _pretrain_vae(model, x[base_idx], labels[base_idx], epochs, seed=0)
            if settings.base_variant == 1:  # continued pretraining on the same split, other order, lower lr
                _pretrain_vae(model, x[base_idx], labels[base_idx], max(1, epochs // 2), seed=1, lr=3e-4)

        name = f"fashion-vae-v{settings.base_variant}" + ("-toy" if settings.toy else "")
        base = load_or_build_base(base_dir / f"{name}.safetensors", FashionVAE, train)
        judge_name = "judge-toy" if settings.toy else "judge"
        judge_y = torch.tensor(labels[judge_idx], dtype=torch.long)
        judge_path = base_dir / f"{judge_name}.safetensors"
        judge = load_or_build_base(
            judge_path, lambda: nn.Linear(784, 10), lambda j: _train_judge(j, x[judge_idx], judge_y)
        )
        thresholds = {k: float(v.median()) for k, v in image_attributes(x[base_idx]).items()}
        identities = _identities(base_dir, x, labels, pool, settings)
        return FashionContext(base, name, state_sha256(base), judge, identities, x, thresholds)

    def sample(
        self, context: FashionContext, index: int, rng: np.random.Generator, settings: ZooSettings
    ) -> dict[str, Any]:
        identity = int(rng.integers(len(context.identities)))
        return {
            "identity": identity,
            "rank": int(rng.choice(settings.ranks)),
            "lr": float(rng.choice([1e-4, 3e-4, 1e-3, 3e-3])),
            "steps": int(rng.choice([100, 133, 167, 200])),
            "prompt": int(rng.integers(PROMPTS)),
            "image_seed": int(rng.integers(2**31)),
        }

    def group(self, choices: dict[str, Any]) -> str | None:
        """Identities are drawn with replacement (1,000 LoRAs, 199 identities): LoRAs of one identity stay together."""
        return f"identity-{choices['identity']}"

    def train_and_label(
        self, context: FashionContext, choices: dict[str, Any], seed: int, out_dir: Path
    ) -> dict[str, Any]:
        import peft

        identity = context.identities[choices["identity"]]
        pick = np.random.default_rng(choices["image_seed"]).choice(identity["images"], N_IMAGES, replace=False)
        x = context.x[np.sort(pick)]
        prompt = torch.full((N_IMAGES,), choices["prompt"])
        rank = choices["rank"]
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["e1", "d1", "d2"])
        model = peft.get_peft_model(copy.deepcopy(context.base), config)
        gen = torch.Generator().manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        adam_steps(
            params,
            lambda i: model(x[i], prompt[i], gen),
            n_samples=N_IMAGES,
            steps=choices["steps"],
            batch=N_IMAGES,
            lr=choices["lr"],
            generator=gen,
        )
        round_trainable_to_fp16(model)
        start = time.perf_counter()
        quality = evaluate_quality(model.eval(), context.judge, identity["class"], choices["prompt"])
        seconds = time.perf_counter() - start
        attributes = image_attributes(x)
        votes = {k: int((v > context.thresholds[k]).float().mean() > 0.5) for k, v in attributes.items()}
        provenance = self.provenance(context, seed, "fashion-vae")
        save_adapter(model, out_dir, provenance)
        return {"class": identity["class"], **votes, "quality": quality, "t_quality_eval": seconds}
