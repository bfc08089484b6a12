"""Table-driven classification of safetensors keys into LoRA modules, and stems into canonical module names.

Every key is matched against :data:`KEY_RULES` by its trailing components (longest suffix first). Keys that share a
stem and a naming family form one module. "up/down" dies here: ``lora_down``/``lora.down``/``lora_A`` are role
``A``, ``lora_up``/``lora.up``/``lora_B`` are role ``B``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from lol_engine.errors import LoraFormatError
from lol_engine.lora.vocab import resolve_kohya_name

__all__ = [
    "ENCODER_WRAPPERS",
    "KEY_RULES",
    "NAMING_FORMATS",
    "VARIANT_NAMES",
    "KeyRule",
    "ModuleKeys",
    "NameOrigin",
    "ResolvedName",
    "Role",
    "canonical_name",
    "classify_key",
    "count_modules",
    "group_keys",
]


class Role(Enum):
    A = "A"
    B = "B"
    ALPHA = "alpha"
    MID = "mid"  # Tucker LoCon core
    SCALE = "scale"  # A1111 per-module scale
    MAGNITUDE = "magnitude"  # DoRA
    BIAS = "bias"  # PEFT lora_bias=True: not part of ΔW
    VARIANT = "variant"  # a non-low-rank adapter part (LoHa, LoKr, …)


@dataclass(frozen=True)
class KeyRule:
    suffix: str  # matched against the end of the key, including its leading "." or "_"
    role: Role
    naming: str  # "ab" (PEFT lora_A/B), "kohya" (lora_down/up), "diffusers" (lora.down, _lora.down,
    # lora_linear_layer), "mlx" (mlx-lm lora_a/lora_b), "cloneofsimo" (unet:N:down/up)
    embedding: bool = False
    variant: str = ""  # for Role.VARIANT: the name of the algorithm


def _rules() -> tuple[KeyRule, ...]:
    rules = [
        # PEFT and diffusers-PEFT: lora_A / lora_B, with or without ".weight" and the unstripped adapter name.
        KeyRule(".lora_A.weight", Role.A, "ab"),
        KeyRule(".lora_B.weight", Role.B, "ab"),
        KeyRule(".lora_A.default.weight", Role.A, "ab"),
        KeyRule(".lora_B.default.weight", Role.B, "ab"),
        KeyRule(".lora_A", Role.A, "ab"),
        KeyRule(".lora_B", Role.B, "ab"),
        KeyRule(".lora_embedding_A", Role.A, "ab", embedding=True),
        KeyRule(".lora_embedding_B", Role.B, "ab", embedding=True),
        KeyRule(".lora_embedding_A.default", Role.A, "ab", embedding=True),
        KeyRule(".lora_embedding_B.default", Role.B, "ab", embedding=True),
        KeyRule(".lora_magnitude_vector", Role.MAGNITUDE, "ab"),
        KeyRule(".lora_magnitude_vector.weight", Role.MAGNITUDE, "ab"),
        KeyRule(".lora_magnitude_vector.default.weight", Role.MAGNITUDE, "ab"),
        KeyRule(".lora_magnitude_vector.default", Role.MAGNITUDE, "ab"),
        KeyRule(".lora_B.bias", Role.BIAS, "ab"),
        KeyRule(".lora_B.default.bias", Role.BIAS, "ab"),
        KeyRule(".alpha", Role.ALPHA, "ab"),  # network_alphas written next to lora_A/B by some trainers
        # kohya / A1111 / ComfyUI / LyCORIS LoCon.
        KeyRule(".lora_down.weight", Role.A, "kohya"),
        KeyRule(".lora_up.weight", Role.B, "kohya"),
        KeyRule(".lora_mid.weight", Role.MID, "kohya"),
        KeyRule(".alpha", Role.ALPHA, "kohya"),
        KeyRule(".scale", Role.SCALE, "kohya"),
        KeyRule(".dora_scale", Role.MAGNITUDE, "kohya"),
        # diffusers: old attention processors, "new" lora layers, text-encoder lora_linear_layer.
        KeyRule(".lora.down.weight", Role.A, "diffusers"),
        KeyRule(".lora.up.weight", Role.B, "diffusers"),
        KeyRule("_lora.down.weight", Role.A, "diffusers"),
        KeyRule("_lora.up.weight", Role.B, "diffusers"),
        KeyRule(".lora_linear_layer.down.weight", Role.A, "diffusers"),
        KeyRule(".lora_linear_layer.up.weight", Role.B, "diffusers"),
        KeyRule(".alpha", Role.ALPHA, "diffusers"),
        # mlx-lm: lora_a (d_in, r) and lora_b (r, d_out), transposed by the parser; DoRA adds the magnitude "m".
        KeyRule(".lora_a", Role.A, "mlx"),
        KeyRule(".lora_b", Role.B, "mlx"),
        KeyRule(".m", Role.MAGNITUDE, "mlx"),
        # cloneofsimo/lora: "unet:12:down", "text_encoder:3:up", named by index (lol_engine.lora.cloneofsimo).
        KeyRule(":down", Role.A, "cloneofsimo"),
        KeyRule(":up", Role.B, "cloneofsimo"),
    ]
    variants = {
        "LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
        "LoKr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2"),
        "OFT": ("oft_blocks", "oft_diag", "oft_R.weight", "oft_r", "oft_s"),
        "BOFT": ("boft_R", "boft_s"),
        "IA3": ("on_input", "ia3_l", "ia3_l.weight"),
        "VeRA": ("vera_lambda_b", "vera_lambda_d"),
        "AdaLoRA": ("lora_E",),
        "full (dense diff)": ("diff", "diff_b"),
        "norm": ("w_norm", "b_norm"),
    }
    for variant, suffixes in variants.items():
        rules += [KeyRule("." + s, Role.VARIANT, "variant", variant=variant) for s in suffixes]
    return tuple(rules)


# How each naming family is named in messages.
NAMING_FORMATS = {
    "ab": "PEFT/diffusers (lora_A/lora_B)",
    "kohya": "kohya/LyCORIS (lora_down/lora_up)",
    "diffusers": "diffusers (lora.down/lora.up)",
    "mlx": "mlx-lm (lora_a/lora_b)",
    "cloneofsimo": "cloneofsimo/lora (unet:N:down/up)",
}


KEY_RULES: tuple[KeyRule, ...] = _rules()
VARIANT_NAMES = tuple(sorted({r.variant for r in KEY_RULES if r.role is Role.VARIANT}))
_SUFFIXES = sorted({r.suffix for r in KEY_RULES}, key=len, reverse=True)
_FACTOR_SUFFIXES = {
    r.suffix: r.naming for r in KEY_RULES if r.role in (Role.A, Role.B, Role.MID, Role.VARIANT)
}  # suffixes that say which naming family a stem belongs to


_A_SUFFIXES = tuple(r.suffix for r in KEY_RULES if r.role is Role.A)
# One pass over a key finds its longest known suffix: the leftmost of the alternatives that end at the key's end.
_SUFFIX_AT_END = re.compile("(?:" + "|".join(re.escape(s) for s in _SUFFIXES) + r")\Z")


def classify_key(key: str) -> tuple[str, str] | None:
    """Split ``key`` into ``(stem, suffix)`` by the longest known suffix, or None when no suffix matches.

    >>> classify_key("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight")
    ('lora_unet_mid_block_attentions_0_proj_in', '.lora_down.weight')
    """
    hit = _SUFFIX_AT_END.search(key)
    if hit is None:
        return None
    if hit.start() > 0:
        return key[: hit.start()], hit.group()
    for suffix in _SUFFIXES:  # the whole key is a suffix: the longest one that leaves a stem
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def count_modules(keys: Iterable[str]) -> int:
    """How many keys are A factors (an upper bound on the modules), counted without grouping anything."""
    return sum(1 for key in keys if key.endswith(_A_SUFFIXES))


@dataclass
class ModuleKeys:
    """The keys of one module stem, by role; ``naming`` is the family its factor keys belong to."""

    stem: str
    naming: str
    keys: dict[Role, str] = field(default_factory=dict)
    embedding: bool = False
    variants: set[str] = field(default_factory=set)


def group_keys(keys: Iterable[str], where: str) -> tuple[dict[str, ModuleKeys], list[str]]:
    """Group keys by module stem. Returns ``(modules by stem, unrecognised keys)``.

    Side keys (alpha, scale, DoRA magnitude) join the module whose factor keys share their stem. A stem with two keys
    of one role (``x.lora_A.weight`` and ``x.lora_A.default.weight``) is refused.
    """
    split = {k: classify_key(k) for k in keys}
    modules: dict[str, ModuleKeys] = {}
    for hit in split.values():  # first pass: factor keys fix each stem's naming
        if hit is not None and hit[1] in _FACTOR_SUFFIXES:
            stem, suffix = hit
            naming = _FACTOR_SUFFIXES[suffix]
            module = modules.setdefault(stem, ModuleKeys(stem, naming))
            if naming != module.naming and "variant" not in (naming, module.naming):
                formats = " and ".join(NAMING_FORMATS[n] for n in (module.naming, naming))
                raise LoraFormatError(f"{where}: module {stem[:80]!r} mixes {formats} key names")
    unknown = []
    for key, hit in split.items():
        if hit is None or hit[0] not in modules:
            unknown.append(key)
            continue
        stem, suffix = hit
        module = modules[stem]
        rule = _rule_for(suffix, module.naming)
        if rule is None:
            unknown.append(key)
            continue
        if rule.role is Role.VARIANT:
            module.variants.add(rule.variant)
            continue
        if rule.role in module.keys:
            raise LoraFormatError(
                f"{where}: module {stem!r} has two {rule.role.value} tensors: {module.keys[rule.role]!r} and {key!r}"
            )
        module.keys[rule.role] = key
        module.embedding |= rule.embedding
    return modules, unknown


def _rule_for(suffix: str, naming: str) -> KeyRule | None:
    for rule in KEY_RULES:
        if rule.suffix == suffix and rule.naming in (naming, "variant"):
            return rule
    return None


_COMPONENT_PREFIXES = (  # diffusers / ComfyUI component prefixes: denoisers lose theirs, text encoders keep theirs
    ("base_model.model.", "", "peft"),
    ("unet.", "", "diffusers"),
    ("transformer.", "", "diffusers"),
    ("diffusion_model.", "", "comfyui"),
    ("lora_unet.", "", "comfyui"),
    ("text_encoder.", "text_encoder.", "diffusers"),
    ("text_encoder_2.", "text_encoder_2.", "diffusers"),
    ("text_encoder_3.", "text_encoder_3.", "diffusers"),
)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")
_TE_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


# Attributes that tools, not users, wrap around a BERT-like encoder (``BertModel``'s own names follow them). They
# are resolved only when what follows is a BertModel module, so no other architecture's names are touched.
ENCODER_WRAPPERS: tuple[tuple[str, str], ...] = (
    ("bert.", "transformers BertFor* head, e.g. BertForSequenceClassification"),
    ("0.auto_model.", "peft on a whole SentenceTransformer (sentence-transformers < 6)"),
    ("0.model.", "peft on a whole SentenceTransformer (sentence-transformers >= 6)"),
    ("auto_model.", "peft on a SentenceTransformer's Transformer module (sentence-transformers < 6)"),
    ("model.", "peft on a SentenceTransformer's Transformer module (sentence-transformers >= 6)"),
)
_BERT_MODULE = re.compile(  # BertModel's adaptable modules: embeddings, BertLayer's linears, the pooler
    r"(encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)"
    r"|pooler\.dense|embeddings\.(word|position|token_type)_embeddings)\Z"
)


@dataclass(frozen=True)
class NameOrigin:
    """Where a module's canonical name came from: the naming family of its factor keys and the rule that named it."""

    naming: str  # the factor keys' family, as ModuleKeys.naming: "ab", "kohya", "diffusers", "mlx", "cloneofsimo", …
    source: str  # the naming rule: "peft" | "kohya" | "diffusers" | "comfyui" | "cloneofsimo" | "plain"
    wrapper: str = ""  # an ENCODER_WRAPPERS prefix resolved away, e.g. "bert."


@dataclass(frozen=True)
class ResolvedName:
    """A module stem's canonical name, and which naming rule gave it."""

    name: str  # canonical module name
    source: str  # "peft" | "kohya" | "diffusers" | "comfyui" | "plain"
    vocabulary: str | None = None  # kohya vocabulary the name was found in
    note: str = ""  # a warning, e.g. a kohya name in no known vocabulary
    wrapper: str = ""  # an ENCODER_WRAPPERS prefix removed from the name, e.g. "bert."

    @property
    def wrapped_name(self) -> str:
        """The name as the tool's model knew it: what PEFT matched ``rank_pattern``/``alpha_pattern`` keys against."""
        return self.wrapper + self.name


def canonical_name(stem: str, naming: str) -> ResolvedName:
    """Turn a module stem into the base model's own module path.

    >>> canonical_name("base_model.model.model.layers.0.self_attn.q_proj", "ab").name
    'model.layers.0.self_attn.q_proj'
    >>> canonical_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out", "diffusers").name
    'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0'
    >>> canonical_name("text_encoder.text_model.encoder.layers.0.self_attn.to_q", "diffusers").name
    'text_encoder.text_model.encoder.layers.0.self_attn.q_proj'

    A tool's wrapper around a BERT encoder (:data:`ENCODER_WRAPPERS`) goes, so every tool's adapter of one encoder
    names its modules as ``BertModel`` does; other architectures keep their paths:

    >>> canonical_name("base_model.model.bert.encoder.layer.0.attention.self.query", "ab")
    ResolvedName(name='encoder.layer.0.attention.self.query', source='peft', vocabulary=None, note='', wrapper='bert.')
    >>> canonical_name("base_model.model.model.encoder.layers.0.self_attn.q_proj", "ab").name
    'model.encoder.layers.0.self_attn.q_proj'
    """
    kohya = resolve_kohya_name(stem)
    if kohya is not None:
        name, vocab = kohya
        note = "" if vocab else f"kohya module {stem!r} is in no known vocabulary; kept as {name!r}"
        return ResolvedName(name, "kohya", vocab, note)
    source = "plain"
    name = stem
    for prefix, replacement, src in _COMPONENT_PREFIXES:
        if stem.startswith(prefix):
            name, source = replacement + stem[len(prefix) :], src
            break
    if naming == "diffusers":
        match = _PROCESSOR.search(name) or re.search(r"\.(to_q|to_k|to_v|to_out)$", name)
        if match and name.startswith("text_encoder"):
            name = name[: match.start()] + "." + _TE_PROCESSOR[match.group(1)]
        elif match:
            proj = match.group(1)
            name = name[: match.start()] + "." + ("to_out.0" if proj == "to_out" else proj)
    for wrapper, _ in ENCODER_WRAPPERS:
        if name.startswith(wrapper) and _BERT_MODULE.match(name, len(wrapper)):
            return ResolvedName(name[len(wrapper) :], source, wrapper=wrapper)
    return ResolvedName(name, source)
