"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a DDPM-trained UNet, a 4-channel VAE."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

from library.families import clip_text
from library.families.base import LoadedModels, ModelFamily, NoisyBatch
from library.maths import noise as noise_fns
from library.maths.loss import apply_mask, elementwise_loss, per_sample_mean
from library.maths.metadata import file_hashes
from library.maths.noise import DDPMOptions
from library.maths.rng import SampleRNG
from library.models.checkpoints import checkpoint_layout
from library.models.fingerprint import module_fingerprint
from library.models.sd_loading import load_sd_model, load_vae
from library.models.tokenizers import model_tokenizers
from library.sampling.samplers import build_scheduler
from library.utils.errors import UserError


@dataclass(frozen=True)
class SDOptions:
    """Options of the SD1/2 family that change the maths."""

    ddpm: DDPMOptions = DDPMOptions()
    v2: bool = False  # --v2: the user says the model is SD2.x; checked against what is loaded
    clip_skip: int | None = None
    max_token_length: int = 75  # 75, 150 or 225: prompts are encoded in windows of 75 tokens
    vae: str | None = None  # --vae: a separate VAE replaces the checkpoint's
    weighted_captions: bool = False  # (word:1.2) emphasis in captions
    emb_normalize: str = "original"  # what weighting restores afterwards (clip_text.apply_weights)
    no_token_padding: bool = False  # kohya's DreamBooth switch: captions padded to the batch's longest, not 77


class SDFamily(ModelFamily):
    """SD1.x and SD2.x (SD2 is detected from the text encoder when the model is loaded)."""

    name = "sd"
    latent_channels = 4
    cache_suffix = "sd"
    checkpoint_layouts = ("sd1", "sd2")
    default_network_module = "networks.lora"
    default_image_size = 512
    size_conditioning = False
    #: diffusers-form LoRA files our loader cannot map go through diffusers' own loader instead
    diffusers_lora_via_pipeline = False
    negative_scale_supported = True  # SDXL inherits it
    unet_denoiser = True
    textual_inversion_keys = ("",)
    compiled_blocks = ("BasicTransformerBlock", "ResnetBlock2D")  # SDXL's UNet has the same blocks
    controlnet_supported = True
    text_encoder_replaceable = True  # SD1's CLIP-L (SD2's encoder is wider: refused by its width)
    size_multiple = 8  # the UNet pads what its downsampling does not divide (diffusers)
    advised_size_multiple = 64
    title = "SD1.x/2.x"
    scaling_factor = 0.18215

    def __init__(self, options: SDOptions = SDOptions()):
        self.options = options
        ztsnr = options.ddpm.zero_terminal_snr
        self.alphas_cumprod = noise_fns.scaled_linear_alphas_cumprod(zero_terminal_snr=ztsnr)

    def load(self, name_or_path: str, dtype: torch.dtype, tokenizer_dir: str | None,
             device: torch.device | None = None) -> LoadedModels:
        parts = load_sd_model(name_or_path, dtype, tokenizer_dir, device)
        if self.options.vae:
            parts.vae = load_vae(self.options.vae, dtype, self.latent_channels, device)
        if self.options.v2 and not parts.v2:
            raise UserError(f"--v2 was given but {name_or_path} is an SD1.x model (its text encoder is CLIP-L); "
                            "remove --v2")
        if parts.prediction_type == "v_prediction" and not self.options.ddpm.v_parameterization:
            raise UserError(f"{name_or_path} is a v-prediction model (its scheduler says so): add --v_parameterization")
        return LoadedModels(denoiser=parts.unet, vae=parts.vae, text_encoders=[parts.text_encoder],
                            tokenizers=[parts.tokenizer], source=name_or_path, variant="sd2" if parts.v2 else "sd1",
                            parts=parts)

    def model_layout(self, models: LoadedModels) -> str:
        return models.variant  # "sd1" / "sd2"

    def load_tokenizers(self, name_or_path: str, tokenizer_dir: str | None) -> list:
        v2 = self.options.v2 or (Path(name_or_path).is_file() and checkpoint_layout(name_or_path) == "sd2")
        return model_tokenizers(name_or_path, tokenizer_dir, ("sd2" if v2 else "clip_l",))

    def save_problem(self, models: LoadedModels, save_as: str) -> str | None:
        if not save_as.startswith("diffusers") and models.variant == "sd2" and not models.parts.unused:
            return ("an SD2 model read from a diffusers folder lacks its text encoder's last layer, which SD2 single "
                    "files carry; save it as a folder (--save_model_as diffusers_safetensors)")
        return None

    def encode_images(self, models: LoadedModels, images: torch.Tensor, rng: SampleRNG | None = None) -> torch.Tensor:
        vae = models.vae
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        if rng is None:
            latents = dist.sample()
        else:  # per-sample draws, so the result does not depend on how the batch is split
            latents = dist.mean + dist.std * rng.randn(*dist.mean.shape[1:]).to(dist.mean)
        return latents * self.scaling_factor

    def encode_prompts(self, models: LoadedModels, captions: list[str], device: torch.device) -> torch.Tensor:
        tokenizer, text_encoder = models.tokenizers[0], models.text_encoders[0]
        skip = self.options.clip_skip or 1

        def encode_window(ids: torch.Tensor) -> torch.Tensor:
            if skip <= 1:
                return text_encoder(ids).last_hidden_state
            hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-skip]
            # kohya's clip_skip: an earlier layer's output, passed through the final layer norm
            return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)

        return clip_text.encode_prompts(tokenizer, encode_window, captions, self.options.max_token_length,
                                        self.options.weighted_captions, device, self.options.emb_normalize,
                                        self.options.no_token_padding)

    def text_encoder_settings(self, models: LoadedModels) -> dict:
        o = self.options
        return {"family": self.name, "encoder": module_fingerprint(models.text_encoders[0]),
                "clip_skip": o.clip_skip or 1, "max_token_length": o.max_token_length,
                "no_token_padding": o.no_token_padding,
                "weighted": o.weighted_captions}

    def make_noisy_batch(self, latents: torch.Tensor, rng: SampleRNG, timestep: int | None = None) -> NoisyBatch:
        o = self.options.ddpm
        noise = rng.randn(*latents.shape[1:]).to(latents.dtype)
        if o.noise_offset:
            noise = noise_fns.offset_noise(noise, latents, o.noise_offset, o.noise_offset_random_strength,
                                           o.adaptive_noise_scale, rng)
        if o.multires_noise_iterations:
            noise = noise_fns.multires_noise(noise, o.multires_noise_iterations, o.multires_noise_discount, rng)
        if timestep is None:
            timesteps = noise_fns.sample_timesteps(rng, o.min_timestep, o.max_timestep)
        else:
            timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=latents.device)
        input_noise = None
        if o.ip_noise_gamma:
            input_noise = noise_fns.perturbed_input_noise(noise, o.ip_noise_gamma, o.ip_noise_gamma_random_strength,
                                                          rng)
        noisy, target = noise_fns.ddpm_noisy_and_target(self.alphas_cumprod, latents, noise, timesteps,
                                                        o.v_parameterization, input_noise)
        return NoisyBatch(noisy, timesteps, target)

    def per_sample_loss(self, prediction: torch.Tensor, batch: NoisyBatch,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        o = self.options.ddpm
        c = None
        if o.loss_type in ("huber", "smooth_l1"):
            c = noise_fns.huber_c(o.huber_schedule, o.huber_c, o.huber_scale, batch.timesteps, self.alphas_cumprod)
        loss = per_sample_mean(apply_mask(elementwise_loss(prediction, batch.target, o.loss_type, c), mask))
        scale = noise_fns.snr_loss_scale(noise_fns.snr(self.alphas_cumprod, batch.timesteps), o.snr_weighting,
                                         o.v_parameterization)
        return loss if scale is None else loss * scale

    def denoise(self, models: LoadedModels, batch: NoisyBatch, conditioning: torch.Tensor) -> torch.Tensor:
        unet = models.denoiser
        return unet(batch.noisy_latents, batch.timesteps, conditioning).sample

    #: diffusers' pipeline classes by kind: (without, with ControlNet)
    PIPELINES = {"txt2img": ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline"),
                 "img2img": ("StableDiffusionImg2ImgPipeline", "StableDiffusionControlNetImg2ImgPipeline"),
                 "inpaint": ("StableDiffusionInpaintPipeline", "StableDiffusionControlNetInpaintPipeline")}

    def _pipeline_class(self, kind: str, controlnet) -> tuple[type, dict]:
        """The pipeline class for ``kind`` and the extra constructor arguments (the ControlNet)."""
        cls = getattr(diffusers, self.PIPELINES[kind][controlnet is not None])
        return cls, ({} if controlnet is None else {"controlnet": controlnet})

    def pipeline(self, models: LoadedModels, sampler: str, kind: str, controlnet=None):
        cls, extra = self._pipeline_class(kind, controlnet)
        return cls(vae=models.vae, text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0],
                   unet=models.denoiser,
                   scheduler=build_scheduler(sampler, self.prediction_type, self.options.ddpm.zero_terminal_snr),
                   safety_checker=None, feature_extractor=None, requires_safety_checker=False, **extra)

    def call_kwargs(self, models: LoadedModels, batch, device: torch.device) -> dict:
        # prompts and negatives are encoded together so long prompts get the same window count
        both = self.encode_prompts(models, list(batch.prompts) + list(batch.negatives), device)
        n = len(batch.prompts)
        return {"prompt_embeds": both[:n], "negative_prompt_embeds": both[n:]}

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if self.options.ddpm.v_parameterization else "epsilon"

    def validation_timesteps(self) -> list[int]:
        """kohya's fixed validation timesteps: the 4 interior points of linspace(min, max, 6)."""
        o = self.options.ddpm
        return [int(o.min_timestep + (o.max_timestep - o.min_timestep) * k / 5) for k in range(1, 5)]

    def _vae_metadata(self) -> dict[str, str]:
        vae = self.options.vae
        if not vae:
            return {"ss_vae_name": "None"}
        meta = {"ss_vae_name": os.path.basename(vae.rstrip("/"))}
        if os.path.isfile(vae):
            meta["ss_vae_hash"], meta["ss_new_vae_hash"] = file_hashes(vae)
        return meta

    def metadata(self, models: LoadedModels) -> dict[str, str]:
        v = self.options.ddpm.v_parameterization
        v2 = models.variant == "sd2"
        if v2:
            version = "sd_v2_v" if v else "sd_v2"
            arch = "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
        else:
            version, arch = "sd_v1", "stable-diffusion-v1"
        return {
            **self.options.ddpm.metadata(),
            "ss_v2": str(v2),
            "ss_base_model_version": version,
            "ss_v_parameterization": str(v),
            "ss_clip_skip": str(self.options.clip_skip) if self.options.clip_skip else "None",
            "ss_max_token_length": str(self.options.max_token_length),
            **self._vae_metadata(),
            "ss_weighted_captions": str(self.options.weighted_captions),
            "modelspec.architecture": arch,
            "modelspec.implementation": "diffusers",
            "modelspec.prediction_type": "v" if v else "epsilon",
        }
