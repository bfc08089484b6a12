"""The LoL models: the paper's five, a canonicalized Transformer, and ``spectral_glnet`` (ours); ``module_tokens``
(ours, :mod:`lol_engine.nn.module_tokens`) registers itself beside them.

Every model maps a :class:`LoraBatch` to ``(N, out_dim)``; those with ``accepts_subsets`` also read a
:class:`~lol_engine.nn.batch.ModuleSetBatch` (LoRAs with different module sets). Invariance (tests/test_nn.py):
``mlp`` none; ``o_align`` O(r) only; ``svd``, ``dense``, ``gl_net``, ``transformer``, ``spectral_glnet`` and
``module_tokens`` GL(r).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lol_engine.errors import NotFoundError
from lol_engine.nn.batch import LoraBatch
from lol_engine.nn.layers import GLLinear, canonicalize, gl_gate, spectra_features
from lol_engine.spec import LoraSpec

__all__ = ["MODELS", "LoLModel", "ModelConfig", "build_model", "registered_models"]


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters shared by the model family; each model reads the ones it needs."""

    hidden: int = field(default=64, metadata={"help": "width of the MLP heads"})
    width: int = field(default=16, metadata={"help": "d of the GL-equivariant layers"})
    layers: int = field(default=1, metadata={"help": "equivariant layers in GL-net (2 adds the GL gate between)"})
    tokens: int = field(default=64, metadata={"help": "token size of the Transformers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    blocks: int = field(default=1, metadata={"help": "Transformer blocks"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in heads and Transformers"})
    max_dense_features: int = field(default=2_000_000, metadata={"help": "MLP+Dense refuses larger ΔW inputs"})
    spectrum: int = field(default=8, metadata={"help": "singular values per module token (module_tokens)"})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``config.json``."""
        return asdict(self)


def _head(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear → LayerNorm → ReLU → Dropout → Linear, the paper's reference head."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


class LoLModel(nn.Module):
    """Base class: built from a spec and an output size; ``prepare`` sees the training batch once."""

    name: ClassVar[str]
    invariance: ClassVar[str]  # "none" | "O(r)" | "GL(r)"
    rank_agnostic: ClassVar[bool] = False
    accepts_subsets: ClassVar[bool] = False  # reads a ModuleSetBatch: any subset of its modules (module_tokens)

    def __init__(self, spec: LoraSpec, out_dim: int, config: ModelConfig) -> None:
        super().__init__()
        self.spec, self.out_dim, self.config = spec, out_dim, config

    def prepare(self, train: LoraBatch) -> None:
        """Fit data-dependent buffers (O-Align's template) before training."""

    def forward(self, batch: LoraBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


MODELS: dict[str, type[LoLModel]] = {}


def register_model(cls: type[LoLModel]) -> type[LoLModel]:
    """Class decorator: make a model available to :func:`build_model` under ``cls.name``."""
    MODELS[cls.name] = cls
    return cls


def registered_models() -> list[str]:
    """Names of every registered model, in registration order."""
    return list(MODELS)


def build_model(name: str, spec: LoraSpec, out_dim: int, config: ModelConfig | None = None) -> LoLModel:
    """Instantiate a registered model."""
    if name not in MODELS:
        raise NotFoundError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](spec, out_dim, config or ModelConfig())


def _flat(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.flatten(1) for t in tensors], dim=1)


@register_model
class MLP(LoLModel):
    """MLP on the flattened raw factors ``[vec A_i, vec B_i]``: not invariant (the baseline)."""

    name, invariance = "mlp", "none"

    def __init__(self, spec: LoraSpec, out_dim: int, config: ModelConfig) -> None:
        super().__init__(spec, out_dim, config)
        in_dim = sum(layer.rank * (layer.d_in + layer.d_out) for layer in spec.layers)
        self.head = _head(in_dim, config.hidden, out_dim, config.dropout)

    def forward(self, batch: LoraBatch) -> Tensor:
        a, b = batch.scaled()
        return self.head(torch.cat([_flat(a), _flat(b)], dim=1))


@register_model
class OAlign(LoLModel):
    """MLP on factors aligned to a template by orthogonal Procrustes: ``M = BᵀB̄ + AĀᵀ = PΣWᵀ``, ``Q = PWᵀ``,
    features ``(QᵀA, BQ)``. O(r)-invariant, not GL(r)-invariant."""

    name, invariance = "o_align", "O(r)"

    def __init__(self, spec: LoraSpec, out_dim: int, config: ModelConfig) -> None:
        super().__init__(spec, out_dim, config)
        for i, layer in enumerate(spec.layers):
            self.register_buffer(f"template_a{i}", torch.zeros(layer.rank, layer.d_in))
            self.register_buffer(f"template_b{i}", torch.zeros(layer.d_out, layer.rank))
        in_dim = sum(layer.rank * (layer.d_in + layer.d_out) for layer in spec.layers)
        self.head = _head(in_dim, config.hidden, out_dim, config.dropout)

    def prepare(self, train: LoraBatch) -> None:
        a, b = train.scaled()
        for i in range(len(self.spec)):  # the first training LoRA is the template, as in the paper
            getattr(self, f"template_a{i}").copy_(a[i][0])
            getattr(self, f"template_b{i}").copy_(b[i][0])

    def align(self, batch: LoraBatch) -> tuple[list[Tensor], list[Tensor]]:
        """The Procrustes-aligned factors."""
        a, b = batch.scaled()
        a_out, b_out = [], []
        for i, (a_i, b_i) in enumerate(zip(a, b, strict=True)):
            ta, tb = getattr(self, f"template_a{i}").to(a_i), getattr(self, f"template_b{i}").to(b_i)
            m = b_i.mT @ tb + a_i @ ta.mT  # (N, r, r)
            p, _, wh = torch.linalg.svd(m)
            q = p @ wh  # (N, r, r)
            a_out.append(q.mT @ a_i)
            b_out.append(b_i @ q)
        return a_out, b_out

    def forward(self, batch: LoraBatch) -> Tensor:
        a, b = self.align(batch)
        return self.head(torch.cat([_flat(a), _flat(b)], dim=1))


@register_model
class SVDFeatures(LoLModel):
    """MLP on the per-module singular values of ΔW (QR route; truncated or zero-padded to the training rank)."""

    name, invariance, rank_agnostic = "svd", "GL(r)", True

    def __init__(self, spec: LoraSpec, out_dim: int, config: ModelConfig) -> None:
        super().__init__(spec, out_dim, config)
        self.widths = [layer.rank for layer in spec.layers]
        self.head = _head(sum(self.widths), config.hidden, out_dim, config.dropout)

    def forward(self, batch: LoraBatch) -> Tensor:
        a, b = batch.scaled()
        feats = [spectra_features(a_i, b_i, w) for a_i, b_i, w in zip(a, b, self.widths, strict=True)]
        return self.head(torch.cat(feats, dim=1))


@register_model
class Dense(LoLModel):
    """MLP on the flattened dense updates ``vec(B_i A_i)``; refuses bases whose ΔW would not fit."""

    name, invariance, rank_agnostic = "dense", "GL(r)", True

    def __init__(self, spec: LoraSpec, out_dim: int, config: ModelConfig) -> None:
        super().__init__(spec, out_dim, config)
        features = sum(layer.d_in * layer.d_out for layer in spec.layers)
        if features > config.max_dense_features:
            raise ValueError(
                f"MLP+Dense needs {features:,} input features per LoRA, over max_dense_features="
                f"{config.max_dense_features:,}; use gl_net or spectral_glnet for this base"
            )
        self.head = _head(features, config.hidden, out_dim, config.dropout)

    def forward(self, batch: LoraBatch) -> Tensor:
        a, b = batch.scaled()
        return self.head(torch.cat([(b_i @ a_i).flatten(1) for a_i, b_i in zip(a, b, strict=True)], dim=1))


class _GLTrunk(nn.Module):
    """Equivariant linear (→ GL gate → equivariant linear) and the invariant ``B̃ Ã`` per module: ``(N, L, d, d)``."""

    def __init__(self, spec: LoraSpec, width: int, layers: int) -> None:
        super().__init__()
        self.first = GLLinear([(layer.d_out, layer.d_in) for layer in spec.layers], width)
        self.second = GLLinear([(width, width)] * len(spec), width) if layers > 1 else None

    def forward(self, a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> Tensor:
        a_h, b_h = self.first(a, b)
        if self.second is not None:
            gated = [gl_gate(a_i, b_i) for a_i, b_i in zip(a_h, b_h, strict=True)]
            a_h, b_h = self.second([g[0] for g in gated], [g[1] for g in gated])
        return torch.stack([b_i @ a_i for a_i, b_i in zip(a_h, b_h, strict=True)], dim=1)  # (N, L, d, d)


@register_model
class GLNet(LoLModel):
    """GL-net: GL-equivariant layers, then the invariant products ``B̃_i Ã_i`` (d×d per module) into an MLP."""

    name, invariance, rank_agnostic = "gl_net", "GL(r)", True

    def __init__(self, spec: LoraSpec, out_dim: int, config: ModelConfig) -> None:
        super().__init__(spec, out_dim, config)
        self.trunk = _GLTrunk(spec, config.width, config.layers)
        self.head = _head(len(spec) * config.width**2, config.hidden, out_dim, config.dropout)

    def forward(self, batch: LoraBatch) -> Tensor:
        a, b = batch.scaled()
        return self.head(self.trunk(a, b).flatten(1))


class _ModuleAttention(nn.Module):
    """Tokens per module + a learned module embedding + CLS → Transformer encoder → CLS output."""

    def __init__(self, n_modules: int, config: ModelConfig, out_dim: int) -> None:
        super().__init__()
        k = config.tokens
        self.position = nn.Parameter(torch.randn(n_modules, k) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, k))
        block = nn.TransformerEncoderLayer(k, config.heads, 2 * k, config.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, config.blocks, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(k), nn.Linear(k, out_dim))

    def forward(self, tokens: Tensor) -> Tensor:  # tokens: (N, L, k)
        x = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens + self.position], dim=1)
        return self.out(self.encoder(x)[:, 0])


@register_model
class CanonTransformer(LoLModel):
    """A Transformer over per-module tokens of the GL-canonical factors (QR, then SVD of the r×r core)."""

    name, invariance = "transformer", "GL(r)"

    def __init__(self, spec: LoraSpec, out_dim: int, config: ModelConfig) -> None:
        super().__init__(spec, out_dim, config)
        self.embed = nn.ModuleList(
            nn.Linear(layer.rank * (layer.d_in + layer.d_out), config.tokens) for layer in spec.layers
        )
        self.attention = _ModuleAttention(len(spec), config, out_dim)

    def forward(self, batch: LoraBatch) -> Tensor:
        a, b = batch.scaled()
        tokens = []
        for a_i, b_i, embed in zip(a, b, self.embed, strict=True):
            a_c, b_c = canonicalize(a_i, b_i)
            tokens.append(embed(torch.cat([a_c.flatten(1), b_c.flatten(1)], dim=1)))
        return self.attention(torch.stack(tokens, dim=1))


@register_model
class SpectralGLNet(LoLModel):
    """Ours: GL-net's invariant sketches ``B̃_i Ã_i`` together with each module's log-spectrum and log-norm of ΔW
    (the features that win dataset-size tasks in the paper), mixed by attention across module tokens and read by an
    MLP over [sketches, spectra, attended tokens]. GL(r)-invariant and rank-agnostic (spectra are truncated or padded
    to the training rank)."""

    name, invariance, rank_agnostic = "spectral_glnet", "GL(r)", True

    def __init__(self, spec: LoraSpec, out_dim: int, config: ModelConfig) -> None:
        super().__init__(spec, out_dim, config)
        self.trunk = _GLTrunk(spec, config.width, config.layers)
        self.widths = [layer.rank for layer in spec.layers]
        self.spectral = nn.ModuleList(nn.Linear(w + 1, config.tokens) for w in self.widths)
        self.attention = _ModuleAttention(len(spec), config, config.tokens)
        features = len(spec) * config.width**2 + sum(w + 1 for w in self.widths) + config.tokens
        self.head = _head(features, config.hidden, out_dim, config.dropout)

    def forward(self, batch: LoraBatch) -> Tensor:
        a, b = batch.scaled()
        sketches = self.trunk(a, b).flatten(1)  # (N, L·d²)
        spectra = []
        for a_i, b_i, w in zip(a, b, self.widths, strict=True):
            logsig = spectra_features(a_i, b_i, w)  # (N, w)
            spectra.append(torch.cat([logsig, torch.logsumexp(2 * logsig, dim=1, keepdim=True) / 2], dim=1))
        tokens = torch.stack([proj(x) for proj, x in zip(self.spectral, spectra, strict=True)], dim=1)  # (N, L, k)
        return self.head(torch.cat([sketches, *spectra, self.attention(tokens)], dim=1))
