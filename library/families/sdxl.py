"""SDXL: the SD family's DDPM maths with two CLIP text encoders, pooled text and size conditioning.

What differs from SD1/SD2 (everything else is inherited from :class:`SDFamily`):

* prompts go through CLIP-L and OpenCLIP bigG; each gives its penultimate layer's hidden states
  (no final layer norm), concatenated to 768 + 1280 features, and bigG's projected pooled output
  of the first 75-token window (kohya and SGM pool the first window only);
* the UNet is also conditioned on each image's original size, crop and target size (the crop
  actually cut from the resized image, see :func:`library.data.dataset.size_conditioning`) and on
  the pooled text;
* latents are scaled by 0.13025, sizes are multiples of 32 (three UNet levels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from library.families import clip_text
from library.families.base import LoadedModels, NoisyBatch
from library.families.sd import SDFamily
from library.maths.noise import DDPMOptions
from library.models.fingerprint import module_fingerprint
from library.models.sd_keys import unet_module_to_ldm
from library.models.sd_loading import load_vae
from library.models.sdxl_loading import load_sdxl_model
from library.models.tokenizers import model_tokenizers
from library.sampling.samplers import build_scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SDXLOptions:
    """Options of the SDXL family that change the maths."""

    ddpm: DDPMOptions = DDPMOptions()
    max_token_length: int = 75
    vae: str | None = None
    weighted_captions: bool = False
    emb_normalize: str = "original"  # what weighting restores afterwards (clip_text.apply_weights)
    # SDXL has no clip_skip (kohya warns and ignores it); kept so the metadata says it was not used
    clip_skip: int | None = None


class SDXLFamily(SDFamily):
    """SDXL base (and models fine-tuned from it, epsilon or v-prediction)."""

    name = "sdxl"
    cache_suffix = "sdxl"
    checkpoint_layouts = ("sdxl",)
    default_image_size = 1024
    size_conditioning = True
    size_multiple = 8
    advised_size_multiple = 32
    title = "SDXL"
    scaling_factor = 0.13025
    textual_inversion_keys = ("clip_l", "clip_g")
    lllite_supported = True
    pooled_text_from_image = True
    text_encoder_replaceable = False

    def __init__(self, options: SDXLOptions = SDXLOptions()):
        super().__init__(options)  # the DDPM schedule and loss maths are SD's
        if options.clip_skip:
            logger.warning("--clip_skip %d has no effect on SDXL: it always uses the penultimate layer of both "
                           "text encoders", options.clip_skip)

    def load(self, name_or_path: str, dtype: torch.dtype, tokenizer_dir: str | None,
             device: torch.device | None = None) -> LoadedModels:
        parts = load_sdxl_model(name_or_path, dtype, tokenizer_dir, device)
        if self.options.vae:
            parts.vae = load_vae(self.options.vae, dtype, self.latent_channels, device)
        # a separate VAE's config may carry SD1's factor; samples decode with the config's value
        parts.vae.register_to_config(scaling_factor=self.scaling_factor)
        return LoadedModels(denoiser=parts.unet, vae=parts.vae,
                            text_encoders=[parts.text_encoder_1, parts.text_encoder_2],
                            tokenizers=[parts.tokenizer_1, parts.tokenizer_2], source=name_or_path, parts=parts)

    def load_tokenizers(self, name_or_path: str, tokenizer_dir: str | None) -> list:
        return model_tokenizers(name_or_path, tokenizer_dir, ("clip_l", "clip_g"))

    def model_layout(self, models: LoadedModels) -> str:
        return "sdxl"  # not SD's variant-based layout

    def block_lr_index(self, models: LoadedModels, parameter: str) -> int:
        """kohya's ``--block_lr`` index of a UNet parameter, from its SGM name: 0 the time and size
        embeddings, 1-9 input blocks 0-8, 10-12 the middle block's parts, 13-21 output blocks 0-8,
        22 the output layers."""
        module, _ = parameter.rsplit(".", 1)
        ldm = unet_module_to_ldm(module, models.denoiser.config)
        top, _, rest = ldm.partition(".")
        first = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}
        if top in first:
            return first[top] + int(rest.split(".")[0])
        return 0 if top in ("time_embed", "label_emb") else 22

    def encode_prompts(self, models: LoadedModels, captions: list[str], device: torch.device) -> dict:
        """``{"hidden": (B, 75k + 2, 768 + 1280), "pooled": (B, 1280)}`` (widths of the real model)."""
        (tok1, tok2), (te1, te2) = models.tokenizers, models.text_encoders
        o = self.options
        hidden1 = clip_text.encode_prompts(
            tok1, lambda ids: te1(ids, output_hidden_states=True).hidden_states[-2], captions, o.max_token_length,
            o.weighted_captions, device, o.emb_normalize)
        pooled: list[torch.Tensor] = []

        def te2_window(ids: torch.Tensor) -> torch.Tensor:
            out = te2(ids, output_hidden_states=True)
            if not pooled:  # windows are encoded in order: the first one gives the pooled output
                pooled.append(out.text_embeds)
            return out.hidden_states[-2]

        hidden2 = clip_text.encode_prompts(tok2, te2_window, captions, o.max_token_length, o.weighted_captions,
                                           device, o.emb_normalize)
        return {"hidden": torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1), "pooled": pooled[0]}

    def text_encoder_settings(self, models: LoadedModels) -> dict:
        o = self.options
        return {"family": self.name, "encoders": [module_fingerprint(te) for te in models.text_encoders],
                "max_token_length": o.max_token_length, "weighted": o.weighted_captions}

    def denoise(self, models: LoadedModels, batch: NoisyBatch, conditioning: dict) -> torch.Tensor:
        unet = models.denoiser
        sizes = batch.size_conditioning
        if sizes is None:  # no data batch behind it: the latents' own size, uncropped
            h, w = batch.noisy_latents.shape[-2] * 8, batch.noisy_latents.shape[-1] * 8
            sizes = torch.tensor([[h, w, 0, 0, h, w]] * batch.noisy_latents.shape[0])
        pooled = conditioning["pooled"]
        added = {"text_embeds": pooled, "time_ids": sizes.to(pooled.device, pooled.dtype)}
        return unet(batch.noisy_latents, batch.timesteps, conditioning["hidden"], added_cond_kwargs=added).sample

    PIPELINES = {"txt2img": ("StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline"),
                 "img2img": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLControlNetImg2ImgPipeline"),
                 "inpaint": ("StableDiffusionXLInpaintPipeline", "StableDiffusionXLControlNetInpaintPipeline")}

    def pipeline(self, models: LoadedModels, sampler: str, kind: str, controlnet=None):
        cls, extra = self._pipeline_class(kind, controlnet)
        (tok1, tok2), (te1, te2) = models.tokenizers, models.text_encoders
        return cls(vae=models.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                   unet=models.denoiser,
                   scheduler=build_scheduler(sampler, self.prediction_type, self.options.ddpm.zero_terminal_snr),
                   **extra)

    def call_kwargs(self, models: LoadedModels, batch, device: torch.device) -> dict:
        both = self.encode_prompts(models, list(batch.prompts) + list(batch.negatives), device)
        n = len(batch.prompts)
        target = (batch.height, batch.width)
        return {"prompt_embeds": both["hidden"][:n], "pooled_prompt_embeds": both["pooled"][:n],
                "negative_prompt_embeds": both["hidden"][n:], "negative_pooled_prompt_embeds": both["pooled"][n:],
                "original_size": batch.original_size or target, "target_size": target,
                "crops_coords_top_left": batch.crop,
                "negative_original_size": batch.negative_original_size or batch.original_size or target,
                "negative_target_size": target}

    def metadata(self, models: LoadedModels) -> dict[str, str]:
        v = self.options.ddpm.v_parameterization
        return {
            **self.options.ddpm.metadata(),
            "ss_v2": "False",
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v_parameterization": str(v),
            "ss_clip_skip": "None",
            "ss_max_token_length": str(self.options.max_token_length),
            **self._vae_metadata(),
            "ss_weighted_captions": str(self.options.weighted_captions),
            "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.prediction_type": "v" if v else "epsilon",
        }


def check_sdxl_resolution(width: int, height: int, where: str) -> None:
    """SDXL was trained at about 1024x1024; much smaller training images give poor results."""
    if width * height < 512 * 512:
        logger.warning("%s: %dx%d is below 512x512; SDXL learns poorly at small sizes (it was trained at "
                       "1024x1024)", where, width, height)

