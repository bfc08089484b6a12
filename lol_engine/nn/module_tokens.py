r"""``module_tokens``: one GL-invariant token per module, so that one predictor reads any subset of a base's modules.

Real LoRAs of one base adapt different modules at different ranks (q/v only, all attention, attention + MLP, some
layers only). This model reads a :class:`~lol_engine.nn.batch.ModuleSetBatch` (or a
:class:`~lol_engine.nn.batch.LoraBatch`) and builds, for every module a LoRA has, one token

.. math::
    t_m = W_\sigma [\log(\sigma(\Delta W_m) + \epsilon), \log(\lVert\Delta W_m\rVert_F + \epsilon)]
        + W_s \operatorname{vec}\big((\Phi_g B_m)(A_m \Psi_g^\top)\big)
        + e_{\mathrm{role}(m)} + e_{\mathrm{block}(m)} + W_d\, f(\mathrm{depth}(m))

- the log-spectrum of ΔW (QR route, truncated or zero-padded to ``config.spectrum`` values) and its log-norm;
- GL-net's invariant sketch ``B̃Ã`` (d×d), with ``Φ_g, Ψ_g`` shared by the modules of one *group* ``g = (role,
  d_out, d_in)``: a layer the predictor never saw, of a role and shape it did see, has its maps;
- which module it is, from its canonical name (:func:`module_identity`): a role embedding, a block-kind embedding and
  Fourier features of its depth, normalised within its block kind so that bases of different depth work.

Tokens go through a Transformer with a CLS token whose ``key_padding_mask`` hides absent modules; the head reads the
CLS output and the masked mean of the module outputs. Every feature is GL(r)-invariant and unchanged by zero-padding
the rank, so the model is GL(r)-invariant and rank-agnostic. **A zero module is an absent one:** a module whose ΔW is
exactly zero (‖ΔW‖²_F = Σ (BᵀB ⊙ AAᵀ) = 0, e.g. PEFT's B = 0 at initialisation) is masked like a module the LoRA
does not have.

**Which modules a predictor uses.** Its vocabulary is the module spec it was built from (the union of its training
LoRAs' modules, saved in ``config.json``). A module is *usable* when its group (role, d_out, d_in) and its block kind
are in the vocabulary; other modules are ignored (:meth:`ModuleTokenNet.usable` names them and
:meth:`~lol_engine.train.checkpoint.Predictor.module_coverage` counts them), and a LoRA with no usable module is
refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lol_engine.nn.batch import LoraBatch, ModuleSetBatch
from lol_engine.nn.models import LoLModel, ModelConfig, _head, register_model
from lol_engine.spec import LayerSpec, LoraSpec

__all__ = ["ModuleIdentity", "ModuleTokenNet", "module_identity"]

# A numeric name component is a block index when it follows one of these containers (or another block index):
# model.layers.3, transformer.h.3, encoder.layer.3, encoder.block.3, down_blocks.1.attentions.0, input_blocks.4.1, …
_CONTAINER = re.compile(r"^(layers?|h|blocks?|\w*_blocks?|attentions|resnets)$")
_EPS = 1e-6
_FREQUENCIES = 4  # Fourier features of the depth: d, sin(πkd), cos(πkd) for k = 1..4


@dataclass(frozen=True)
class ModuleIdentity:
    """Which module a canonical name is: its role inside its block, the block kind and the block indices.

    >>> module_identity("model.layers.3.self_attn.q_proj")
    ModuleIdentity(role='self_attn.q_proj', block='model.layers.#', index=(3,))
    >>> module_identity("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0")
    ModuleIdentity(role='attn1.to_out.0', block='down_blocks.#.attentions.#.transformer_blocks.#', index=(1, 0, 0))
    >>> module_identity("fc1")
    ModuleIdentity(role='fc1', block='', index=())
    """

    role: str
    block: str
    index: tuple[int, ...]


def module_identity(name: str) -> ModuleIdentity:
    """Parse a canonical module name (see :class:`ModuleIdentity`); the last component is never an index."""
    parts = name.split(".")
    positional = [False] * len(parts)
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit() and (positional[i - 1] or _CONTAINER.match(parts[i - 1])):
            positional[i] = True
    last = max((i for i, p in enumerate(positional) if p), default=-1)
    block = ".".join("#" if positional[i] else parts[i] for i in range(last + 1))
    index = tuple(int(parts[i]) for i in range(last + 1) if positional[i])
    return ModuleIdentity(".".join(parts[last + 1 :]), block, index)


@dataclass(frozen=True)
class _Slot:
    """A usable module of a batch: its column in the batch, group, role, block kind and normalised depth."""

    column: int
    group: int
    role: int
    block: int
    depth: float


@register_model
class ModuleTokenNet(LoLModel):
    """One GL-invariant token per module (spectrum, norm, GL-net sketch, module identity), a masked Transformer over
    the modules a LoRA has, then an MLP head; any subset of the vocabulary's modules, at any rank (see the module)."""

    name, invariance, rank_agnostic, accepts_subsets = "module_tokens", "GL(r)", True, True

    def __init__(self, spec: LoraSpec, out_dim: int, config: ModelConfig) -> None:
        super().__init__(spec, out_dim, config)
        ids = [module_identity(layer.name) for layer in spec.layers]
        self.roles = sorted({i.role for i in ids})
        self.blocks = sorted({i.block for i in ids})
        self.groups = sorted({(i.role, layer.d_out, layer.d_in) for i, layer in zip(ids, spec.layers, strict=True)})
        self.extent: dict[str, tuple[int, ...]] = {}  # per block kind: the largest index seen at each position
        for i in ids:
            known = self.extent.get(i.block, i.index)
            self.extent[i.block] = tuple(max(x, y) for x, y in zip(known, i.index, strict=True))
        d, k, w = config.width, config.tokens, config.spectrum
        # Φ_g: (d, d_out) and Ψ_g: (d, d_in) per group (role, d_out, d_in), as GLLinear initialises them
        self.phi = nn.ParameterList(nn.Parameter(torch.randn(d, g[1]) / math.sqrt(g[1])) for g in self.groups)
        self.psi = nn.ParameterList(nn.Parameter(torch.randn(d, g[2]) / math.sqrt(g[2])) for g in self.groups)
        self.spectral = nn.Linear(w + 1, k)
        self.sketch = nn.Linear(d * d, k)
        self.role = nn.Embedding(len(self.roles), k)
        self.block = nn.Embedding(len(self.blocks), k)
        self.depth = nn.Linear(1 + 2 * _FREQUENCIES, k)
        for table in (self.role, self.block):
            nn.init.normal_(table.weight, std=0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, k))
        layer = nn.TransformerEncoderLayer(k, config.heads, 2 * k, config.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(k)
        self.head = _head(2 * k, config.hidden, out_dim, config.dropout)
        self._slots_of: dict[LoraSpec, list[_Slot]] = {}

    def vocabulary(self) -> dict[str, Any]:
        """What it knows, JSON-ready (``config.json``): roles, block kinds and their extent, (role, shape) groups."""
        return {
            "roles": self.roles,
            "blocks": {block: list(self.extent[block]) for block in self.blocks},
            "groups": [list(g) for g in self.groups],
        }

    def usable(self, spec: LoraSpec) -> tuple[list[str], list[str]]:
        """The names of ``spec``'s modules this model reads, and those it ignores (role, shape or block unknown)."""
        used = {spec.layers[s.column].name for s in self._slots(spec)}
        return [n for n in spec.names if n in used], [n for n in spec.names if n not in used]

    def _slots(self, spec: LoraSpec) -> list[_Slot]:
        if spec not in self._slots_of:
            if len(self._slots_of) >= 256:  # one entry per layout seen; uploads bring new ones
                self._slots_of.clear()
            self._slots_of[spec] = [s for j, layer in enumerate(spec.layers) if (s := self._slot(j, layer))]
        return self._slots_of[spec]

    def _slot(self, column: int, layer: LayerSpec) -> _Slot | None:
        ident = module_identity(layer.name)
        group = (ident.role, layer.d_out, layer.d_in)
        if group not in self.groups or ident.block not in self.extent:
            return None
        depth, unit = 0.0, 1.0  # lexicographic position in [0, 1): index i over (extent + 1) at every level
        for i, top in zip(ident.index, self.extent[ident.block], strict=True):
            unit /= top + 1
            depth += i * unit
        role, block = self.roles.index(ident.role), self.blocks.index(ident.block)
        return _Slot(column, self.groups.index(group), role, block, depth)

    def _module_tokens(self, group: int, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Invariant tokens ``(N, c, k)`` of ``c`` modules of one group, and whether each ΔW is nonzero ``(N, c)``."""
        from lol_engine.symmetry import singular_values

        w = self.config.spectrum
        sigma = singular_values(a, b)  # (N, c, r)
        sigma = sigma[..., :w] if sigma.shape[-1] >= w else nn.functional.pad(sigma, (0, w - sigma.shape[-1]))
        norm = sigma.square().sum(-1, keepdim=True).sqrt()  # (N, c, 1) = ‖ΔW‖_F
        spectra = torch.cat([torch.log(sigma + _EPS), torch.log(norm + _EPS)], dim=-1)  # (N, c, w + 1)
        b_h = torch.einsum("ncor,do->ncdr", b, self.phi[group])  # (N, c, d, r)  B-like
        a_h = torch.einsum("ncri,ei->ncre", a, self.psi[group])  # (N, c, r, d)  A-like
        sketch = (b_h @ a_h).flatten(-2)  # (N, c, d²)  invariant
        nonzero = norm[..., 0] > 0  # (N, c): exactly 0 only for a zero ΔW (zero factors give zero R factors)
        return self.spectral(spectra) + self.sketch(sketch), nonzero

    def forward(self, batch: LoraBatch | ModuleSetBatch) -> Tensor:
        if isinstance(batch, LoraBatch):
            batch = ModuleSetBatch.from_lora_batch(batch)
        a, b = batch.scaled()
        slots = self._slots(batch.spec)
        n, k = len(batch), self.config.tokens
        like = batch.scale
        tokens, present, order = [], [], []
        for group in sorted({s.group for s in slots}):
            members = [s for s in slots if s.group == group]
            cols = [s.column for s in members]
            a_g = torch.stack([a[j] for j in cols], dim=1)  # (N, c, r, d_in)
            b_g = torch.stack([b[j] for j in cols], dim=1)  # (N, c, d_out, r)
            t, nonzero = self._module_tokens(group, a_g, b_g)
            tokens.append(t)
            present.append(batch.present[:, cols] & nonzero)
            order += members
        if order:
            depth = torch.tensor([s.depth for s in order], dtype=like.dtype, device=like.device)[:, None]  # (U, 1)
            freq = math.pi * torch.arange(1, _FREQUENCIES + 1, dtype=like.dtype, device=like.device)  # (F,)
            fourier = torch.cat([depth, torch.sin(depth * freq), torch.cos(depth * freq)], dim=1)  # (U, 1 + 2F)
            roles = torch.tensor([s.role for s in order], device=like.device)
            blocks = torch.tensor([s.block for s in order], device=like.device)
            identity = self.role(roles) + self.block(blocks) + self.depth(fourier)  # (U, k)
            x = torch.cat(tokens, dim=1) + identity  # (N, U, k)
            mask = torch.cat(present, dim=1)  # (N, U)
        else:
            x, mask = like.new_zeros(n, 0, k), torch.zeros(n, 0, dtype=torch.bool, device=like.device)
        x = torch.where(mask[..., None], x, 0.0)  # absent modules carry nothing, not even their identity
        hide = torch.cat([mask.new_zeros(n, 1), ~mask], dim=1)  # (N, 1 + U): True = not attended to
        out = self.encoder(torch.cat([self.cls.expand(n, -1, -1), x], dim=1), src_key_padding_mask=hide)
        weight = mask[..., None].to(out.dtype)  # (N, U, 1)
        mean = (out[:, 1:] * weight).sum(1) / weight.sum(1).clamp(min=1.0)  # (N, k)
        return self.head(torch.cat([self.norm(out[:, 0]), self.norm(mean)], dim=1))
