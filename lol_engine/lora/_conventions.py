r"""Conventions used everywhere in ``lol_engine``. They are written here once.

**The PEFT convention.** One adapted module carries

.. math::
    A \in \mathbb R^{r \times d_{in}}, \qquad B \in \mathbb R^{d_{out} \times r}, \qquad
    \Delta W = s \cdot B A .

* kohya ``lora_down`` is ``A``, ``lora_up`` is ``B``, ``.alpha`` is ``alpha``. "up/down" is translated by the
  readers in :mod:`lol_engine.lora.keys` and never appears downstream.
* ``scale`` is explicit: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA, or ``1`` when a format bakes it in.
  Folding it into the factors is the named function :meth:`LoraWeights.fold_scale`; it never happens silently.
* **Conv modules are flattened** at the parsing boundary: ``A (r, c_in, kh, kw) -> (r, c_in*kh*kw)``,
  ``B (c_out, r, 1, 1) -> (c_out, r)``. ``orig_shape`` keeps ``(c_out, c_in, kh, kw)`` so ΔW can be reshaped back.
  Tucker LoCon (``lora_mid``) is contracted into ``A`` first.
* **Embedding modules** (PEFT ``lora_embedding_A/B``) keep ``A (r, num_embeddings)``, ``B (dim, r)``; the canonical
  ΔW ``B A`` is ``(dim, num_embeddings)``, the transpose of the update to the ``(num_embeddings, dim)`` table.

**The group action.** For ``G`` in GL(r): ``g·(A, B) = (G A, B G⁻¹)``. "A-like" tensors transform by ``G·`` on the
left, "B-like" tensors by ``·G⁻¹`` on the right. A LoRA with ``L`` modules carries ``GL(r_1) × … × GL(r_L)``.

**Shape letters.** ``N`` batch, ``L`` modules, ``r`` rank, ``c`` channels, ``d_in``/``d_out``. ``B`` never means batch.
einsum indices: ``n`` batch, ``r``/``s`` rank, ``i`` d_in, ``o`` d_out.

**Module names** are the base model's own module paths: PEFT keys lose ``base_model.model.``; SD/SDXL/Flux UNet and
transformer modules lose ``unet.``/``transformer.``/``diffusion_model.``; text encoders keep ``text_encoder.``,
``text_encoder_2.``, ``text_encoder_3.``. kohya names are looked up in generated module vocabularies, never split on
``_``. A BERT encoder is named as ``BertModel`` names it (``encoder.layer.N.attention.self.query``, …) whichever tool
wrapped it: the wrappers in :data:`lol_engine.lora.keys.ENCODER_WRAPPERS` (``bert.`` of transformers' heads,
``0.model.``/``0.auto_model.``/``model.``/``auto_model.`` of sentence-transformers) go, and only in front of a
``BertModel`` module; the resolved prefix is named in the family evidence. Other wrappers are kept as written.

**Device and dtype follow the inputs.** Readers return float32 on the CPU; nothing in the library picks a device.
"""

from __future__ import annotations

from lol_engine.spec import KINDS, ModuleKind

__all__ = ["KINDS", "ModuleKind"]  # linear, conv, embedding (above); defined in lol_engine.spec
