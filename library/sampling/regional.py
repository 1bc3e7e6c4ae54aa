"""Regional LoRA with regional prompts (kohya's ``AND`` prompts with ``--mask_path`` and LoRAs).

With N LoRAs and a region mask image (``--mask_path`` without ``--image_path``), a prompt
``A AND B AND C`` has one sub-prompt per LoRA. LoRA i owns region i of the mask: the red, green and
blue channels for the first three LoRAs, or with ``--network_regional_mask_max_color_codes M``
the pixels of colour code i + 1 (bit 0 red, bit 1 green, bit 2 blue: 1 red, 2 green, 3 yellow, 4
blue, ...) for the first M; later LoRAs cover the whole image. Then, as in kohya's:

* every UNet LoRA update is multiplied by its region (at the layer's resolution; the time
  embedding's by 1/N), except the cross-attention keys/values;
* cross attention attends to each sub-prompt separately (its keys/values with only its own LoRA)
  and mixes the results by the regions (a region-weighted mean); the negative prompt's rows use no
  LoRA in keys/values;
* sub-prompt i is encoded with only LoRA i's text-encoder part, the negative prompt with none.

Sub-prompts are encoded in 75-token windows and joined along the token axis, so the pipelines
pass them through unchanged; a processor on each cross-attention layer splits them again.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from library.utils.errors import UserError


def region_masks(image: Image.Image, count: int, color_codes: int | None, width: int, height: int) -> list:
    """One (height, width) mask in [0, 1] per LoRA (kohya's channel or colour-code regions)."""
    limit = color_codes if color_codes else 3
    resample = Image.NEAREST if color_codes else Image.BILINEAR
    pixels = np.asarray(image.convert("RGB").resize((width, height), resample), dtype=np.float32)
    masks = []
    for i in range(count):
        if i >= limit:
            masks.append(torch.ones(height, width))
        elif color_codes:
            code = np.array([(i + 1) & 1, ((i + 1) >> 1) & 1, ((i + 1) >> 2) & 1], dtype=np.float32) * 255
            masks.append(torch.from_numpy(np.all(pixels == code, axis=2).astype(np.float32)))
        else:
            masks.append(torch.from_numpy(pixels[:, :, i] / 255.0))
    return masks


class RegionMask:
    """The mask a LoRA update is multiplied by, found from the update's shape."""

    def __init__(self, mask: torch.Tensor, latent_size: tuple[int, int], count: int):
        self.mask, self.latent_size, self.count = mask, latent_size, count
        self._cache: dict = {}

    def at(self, size: tuple[int, int], device, dtype) -> torch.Tensor:
        key = (size, device, dtype)
        if key not in self._cache:
            m = F.interpolate(self.mask[None, None], size=size, mode="bilinear", align_corners=False)
            self._cache[key] = m.to(device, dtype)
        return self._cache[key]

    def for_tokens(self, tokens: int, device, dtype) -> torch.Tensor | None:
        h, w = self.latent_size
        for _ in range(6):  # the UNet's levels: each halves the size (rounding up)
            if h * w == tokens:
                return self.at((h, w), device, dtype).reshape(1, tokens, 1)
            h, w = (h + 1) // 2, (w + 1) // 2
        return None

    def __call__(self, lx: torch.Tensor) -> torch.Tensor:
        if lx.ndim == 4:
            return self.at(tuple(lx.shape[-2:]), lx.device, lx.dtype)
        if lx.ndim == 3:
            mask = self.for_tokens(lx.shape[1], lx.device, lx.dtype)
            if mask is not None:
                return mask
        # kohya: layers without a spatial layout (time embedding) share the update between the LoRAs
        return torch.full((1,) * lx.ndim, 1.0 / self.count, device=lx.device, dtype=lx.dtype)


def split_prompt(text: str) -> list[str]:
    return [part.strip() for part in text.split(" AND ")]


class RegionalLoRA:
    """Regional LoRA for a run: the LoRAs, the region image and how to read it."""

    def __init__(self, networks: list, mask_image: Image.Image, color_codes: int | None):
        if any(n.merged for n in networks):
            raise UserError("regional LoRA (--mask_path without --image_path) needs hooked LoRAs: drop "
                            "--network_merge / --network_merge_n_models")
        if any(not n.network.capabilities.per_module for n in networks):
            raise UserError("regional LoRA works with kohya-format LoRAs of networks.lora")
        self.networks = [n.network for n in networks]
        self.mask_image, self.color_codes = mask_image, color_codes

    def check_batch(self, batch) -> None:
        counts = {len(split_prompt(p)) for p in batch.prompts}
        if counts != {len(self.networks)}:
            raise UserError(f"regional LoRA: each prompt needs one sub-prompt per LoRA, joined with ' AND ' "
                            f"({len(self.networks)} LoRAs; this line has {sorted(counts)})")

    def call_kwargs(self, family, models, batch, device) -> dict:
        """The family's pipeline arguments with the sub-prompts joined along the token axis."""
        subs = [[split_prompt(p)[i] for p in batch.prompts] for i in range(len(self.networks))]
        with self._text_loras(None):
            base = family.call_kwargs(models, batch, device)  # the negatives, encoded without LoRA
        parts = []
        for i, prompts in enumerate(subs):
            with self._text_loras(i):
                parts.append(family.call_kwargs(models, replace(batch, prompts=prompts), device))
        lengths = {p["prompt_embeds"].shape[1] for p in parts} | {base["negative_prompt_embeds"].shape[1]}
        if len(lengths) != 1:
            raise UserError("regional LoRA: keep each sub-prompt and the negative prompt within 75 tokens "
                            "(--max_embeddings_multiples 1)")
        kwargs = dict(parts[0])
        kwargs["prompt_embeds"] = torch.cat([p["prompt_embeds"] for p in parts], dim=1)
        kwargs["negative_prompt_embeds"] = base["negative_prompt_embeds"].repeat(1, len(parts), 1)
        if "negative_pooled_prompt_embeds" in base:
            kwargs["negative_pooled_prompt_embeds"] = base["negative_pooled_prompt_embeds"]
        return kwargs

    @contextlib.contextmanager
    def _text_loras(self, only: int | None):
        """Only network ``only``'s text-encoder LoRAs act (none for None)."""
        for i, net in enumerate(self.networks):
            for lora in net.text_encoder_modules():
                lora.enabled = i == only
        try:
            yield
        finally:
            for net in self.networks:
                for lora in net.text_encoder_modules():
                    lora.enabled = True

    @contextlib.contextmanager
    def active(self, unet, batch):
        """Regions on the UNet LoRAs and the regional cross-attention, for one pipeline call."""
        masks = region_masks(self.mask_image, len(self.networks), self.color_codes, batch.width, batch.height)
        latent = (batch.height // 8, batch.width // 8)
        regions = [RegionMask(m, latent, len(masks)) for m in masks]
        cross = {name: m for name, m in unet.named_modules() if getattr(m, "is_cross_attention", False)}
        kv_ids = {id(layer) for m in cross.values() for layer in (m.to_k, m.to_v)}
        kv_loras: dict[int, list] = {}
        for i, net in enumerate(self.networks):
            for lora in net.unet_modules():
                if id(lora.org_module) in kv_ids:
                    kv_loras.setdefault(id(lora.org_module), [None] * len(masks))[i] = lora
                else:
                    lora.region = regions[i]
        saved = {name: m.processor for name, m in cross.items()}
        processor = RegionalAttention(regions, kv_loras, len(batch.prompts))
        for m in cross.values():
            m.set_processor(processor)
        try:
            yield
        finally:
            for name, m in cross.items():
                m.set_processor(saved[name])
            for net in self.networks:
                for lora in net.unet_modules():
                    lora.region = None


class RegionalAttention:
    """Cross attention to each sub-prompt, mixed by the regions (see the module docstring)."""

    def __init__(self, regions: list[RegionMask], kv_loras: dict[int, list], batch_size: int):
        self.regions, self.kv_loras, self.batch_size = regions, kv_loras, batch_size

    @contextlib.contextmanager
    def _only(self, layers, index: int | None):
        """For the key/value layers: only LoRA ``index`` acts (none for None)."""
        switched = [(lora, j == index) for layer in layers
                    for j, lora in enumerate(self.kv_loras.get(id(layer), [])) if lora is not None]
        for lora, on in switched:
            lora.enabled = on
        try:
            yield
        finally:
            for lora, _ in switched:
                lora.enabled = True

    def _attend(self, attn, query, context, index: int | None):
        with self._only((attn.to_k, attn.to_v), index):
            key, value = attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        b, n, _ = query.shape
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, n, -1).to(query.dtype)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if hidden_states.ndim != 3 or attention_mask is not None:
            raise UserError("regional LoRA: this model's cross attention has a layout it does not handle")
        query = attn.to_q(hidden_states)
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross \
            else encoder_hidden_states
        chunks = context.chunk(len(self.regions), dim=1)
        negatives = hidden_states.shape[0] - self.batch_size  # the CFG batch: negative rows first
        outs = []
        if negatives:
            outs.append(self._attend(attn, query[:negatives], chunks[0][:negatives], None))
        tokens = query.shape[1]
        mixed, total = 0, 0
        for i, chunk in enumerate(chunks):
            mask = self.regions[i].for_tokens(tokens, query.device, query.dtype)
            if mask is None:
                raise UserError("regional LoRA: the image size must be a multiple of 64 (the UNet's levels)")
            mixed = mixed + self._attend(attn, query[negatives:], chunk[negatives:], i) * mask
            total = total + mask
        outs.append(mixed / (total + 1e-4))
        hidden = attn.to_out[1](attn.to_out[0](torch.cat(outs)))
        return hidden / attn.rescale_output_factor
