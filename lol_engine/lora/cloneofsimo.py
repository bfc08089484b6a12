"""cloneofsimo/lora ("safeloras") files: modules named by their index, mapped back to module names for SD 1.x.

``lora_diffusion.save_safeloras`` writes ``unet:N:down`` / ``unet:N:up`` and ``text_encoder:N:down`` / ``…:up``,
where N counts the injected ``nn.Linear`` layers in the order ``_find_modules_v2`` meets them: every module whose
class is in the component's target set (stored as JSON under ``__metadata__["unet"]``), in ``model.modules()``
order, then its ``nn.Linear`` descendants in ``named_modules()`` order. ``realize_as_lora`` multiplies ``up`` by the
layer's scale before saving, so the scale is baked in (1). Textual-inversion vectors (``<s1>``, flagged ``<embed>``
in the metadata) sit beside them and are skipped.

Index → name needs the base architecture, which the file does not record. This module knows SD 1.x: the UNet in
diffusers' registration order (``down_blocks``, ``up_blocks``, then ``mid_block``), under both orders diffusers has
had inside a transformer block (``attn1, attn2, ff`` since 0.13; ``attn1, ff, attn2`` before), and CLIP-L's
``k, v, q, out`` projections. The order is chosen by the factors' shapes, which differ between the two; a file that
matches neither is refused with the first mismatch named.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

from lol_engine.errors import LoraFormatError

__all__ = ["FORMAT", "resolve"]

FORMAT = "cloneofsimo/lora (safeloras)"
_UNET_ATTENTION = frozenset({"CrossAttention", "Attention"})
_UNET_DEFAULT = _UNET_ATTENTION | {"GEGLU"}
_CROSS = 768  # SD 1.x text-encoder width, the input of attn2.to_k / to_v


def _sd1_blocks() -> Iterator[tuple[str, int]]:
    """``(transformer block path, channels)`` of the SD 1.x UNet in ``model.modules()`` order."""
    for i, ch in enumerate((320, 640, 1280)):
        for j in range(2):
            yield f"down_blocks.{i}.attentions.{j}.transformer_blocks.0", ch
    for i, ch in ((1, 1280), (2, 640), (3, 320)):
        for j in range(3):
            yield f"up_blocks.{i}.attentions.{j}.transformer_blocks.0", ch
    yield "mid_block.attentions.0.transformer_blocks.0", 1280


def _attention(path: str, ch: int, cross: bool) -> list[tuple[str, int, int]]:
    d_kv = _CROSS if cross else ch
    return [
        (f"{path}.to_q", ch, ch),
        (f"{path}.to_k", d_kv, ch),
        (f"{path}.to_v", d_kv, ch),
        (f"{path}.to_out.0", ch, ch),
    ]


def unet_orders(targets: frozenset[str]) -> dict[str, list[tuple[str, int, int]]]:
    """``{order name: [(module name, d_in, d_out)]}`` of the SD 1.x UNet for a target set, one per diffusers order."""
    geglu = "GEGLU" in targets
    orders: dict[str, list[tuple[str, int, int]]] = {}
    for label, ff_first in (
        ("diffusers ≥ 0.13 (attn1, attn2, ff)", False),
        ("diffusers < 0.13 (attn1, ff, attn2)", True),
    ):
        names: list[tuple[str, int, int]] = []
        for path, ch in _sd1_blocks():
            ff = [(f"{path}.ff.net.0.proj", ch, 8 * ch)] if geglu else []
            attn1, attn2 = _attention(f"{path}.attn1", ch, False), _attention(f"{path}.attn2", ch, True)
            names += attn1 + ff + attn2 if ff_first else attn1 + attn2 + ff
        orders[label] = names
    return orders


def text_encoder_order() -> list[tuple[str, int, int]]:
    """CLIP-L (SD 1.x) attention projections in ``CLIPAttention``'s registration order: k, v, q, out."""
    return [
        (f"text_encoder.text_model.encoder.layers.{i}.self_attn.{p}_proj", 768, 768)
        for i in range(12)
        for p in ("k", "v", "q", "out")
    ]


def _targets(metadata: Mapping[str, str], component: str, where: str) -> frozenset[str] | None:
    text = metadata.get(component)
    if text is None:
        return None
    try:
        value = json.loads(text) if len(text) < 1000 else None
    except (json.JSONDecodeError, RecursionError):
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LoraFormatError(f"{where}: {FORMAT} file whose {component!r} target list is not a list of class names")
    return frozenset(value)


def resolve(shapes: Mapping[str, tuple[int, int]], metadata: Mapping[str, str], where: str) -> dict[str, str]:
    """``{stem: module name}`` for stems ``"<component>:<index>"`` with canonical ``(d_in, d_out)`` shapes.

    Raises :class:`LoraFormatError` naming the format and what does not fit: an unknown component, a target set other
    than SD 1.x's attention layers, a module count or a shape that no SD 1.x module order explains.
    """
    by_component: dict[str, dict[int, str]] = {}
    for stem in shapes:
        component, _, index = stem.partition(":")
        if not index.isdigit() or len(index) > 6:
            raise LoraFormatError(f"{where}: {FORMAT} key {stem!r} does not end in a module index")
        by_component.setdefault(component, {})[int(index)] = stem
    out: dict[str, str] = {}
    for component, stems in by_component.items():
        if sorted(stems) != list(range(len(stems))):
            missing = min(set(range(len(stems))) - set(stems))
            raise LoraFormatError(f"{where}: {FORMAT} file lacks module {component}:{missing}")
        targets = _targets(metadata, component, where)
        if component == "unet":
            targets = targets if targets is not None else (_UNET_DEFAULT if len(stems) == 144 else _UNET_ATTENTION)
            if not targets <= _UNET_DEFAULT or not targets & _UNET_ATTENTION:
                raise LoraFormatError(
                    f"{where}: {FORMAT} file with UNet targets {sorted(targets)}: only the attention targets "
                    f"{sorted(_UNET_DEFAULT)} of SD 1.x can be mapped from module index to name"
                )
            orders = unet_orders(targets)
        elif component == "text_encoder":
            if targets is not None and targets != {"CLIPAttention"}:
                raise LoraFormatError(
                    f"{where}: {FORMAT} file with text-encoder targets {sorted(targets)}: only CLIPAttention can be "
                    "mapped from module index to name"
                )
            orders = {"CLIP-L": text_encoder_order()}
        else:
            raise LoraFormatError(
                f"{where}: {FORMAT} file with a component {component!r}: only unet and text_encoder are known"
            )
        out |= _match(component, stems, shapes, orders, where)
    return out


def _match(
    component: str,
    stems: Mapping[int, str],
    shapes: Mapping[str, tuple[int, int]],
    orders: Mapping[str, list[tuple[str, int, int]]],
    where: str,
) -> dict[str, str]:
    found = [shapes[stems[i]] for i in range(len(stems))]
    problems = []
    for label, order in orders.items():
        if len(order) != len(found):
            problems.append(f"{label} has {len(order)} modules, the file {len(found)}")
            continue
        bad = next((i for i, (_, d_in, d_out) in enumerate(order) if found[i] != (d_in, d_out)), None)
        if bad is None:
            return {stems[i]: name for i, (name, _, _) in enumerate(order)}
        name, d_in, d_out = order[bad]
        problems.append(f"{label}: {component}:{bad} is {found[bad][0]}→{found[bad][1]} but {name} is {d_in}→{d_out}")
    raise LoraFormatError(
        f"{where}: {FORMAT} file whose {component} modules match no SD 1.x module order, so their names are "
        f"unknown ({'; '.join(problems)})"
    )
