"""SD3 / SD3.5: an MMDiT trained by flow matching, three text encoders, a 16-channel VAE.

* Prompts: CLIP-L and CLIP-G give their penultimate hidden states (77 tokens each, concatenated to
  768 + 1280 features and zero-padded to T5's width) and their projected pooled outputs
  (concatenated: the MMDiT's pooled input); T5-XXL gives up to ``--t5xxl_max_token_length``
  states appended along the sequence (zeros when no T5 is loaded). The parts are kept separate in
  the conditioning so per-encoder caption dropout can zero one of them after caching.
* Training maths: :mod:`library.maths.flow`.
* Latents: (x - 0.0609) * 1.5305.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import diffusers
import torch

from library.families.base import LoadedModels, ModelFamily, NoisyBatch
from library.maths import flow
from library.maths.flow import FlowOptions
from library.maths.loss import apply_mask, elementwise_loss, per_sample_mean
from library.maths.rng import SampleRNG
from library.models.block_swap import BlockSwap, install_block_swap
from library.models.fingerprint import module_fingerprint
from library.models.sd3_loading import SD3_VAE_SCALE, SD3_VAE_SHIFT, load_sd3_model, save_sd3_single_file
from library.models.sd3_pos_embed import PosEmbedOptions
from library.models.sd_loading import load_vae
from library.utils.errors import UserError

logger = logging.getLogger(__name__)

CLIP_TOKENS = 77
PARTS = ("clip_l", "clip_g", "t5")


@dataclass(frozen=True)
class SD3Options:
    """Options of the SD3 family that change what is computed."""

    flow: FlowOptions = FlowOptions()
    clip_l: str | None = None
    clip_g: str | None = None
    t5xxl: str | None = None
    vae: str | None = None
    t5xxl_max_token_length: int = 256
    apply_lg_attn_mask: bool = False
    apply_t5_attn_mask: bool = False
    clip_l_dropout_rate: float = 0.0
    clip_g_dropout_rate: float = 0.0
    t5_dropout_rate: float = 0.0
    sample_shift: float = 3.0  # the flow scheduler's shift for sample images (SD3's default)
    pos_emb_random_crop_rate: float = 0.0
    # --enable_scaled_pos_embed: the patched sides of the training resolutions
    scaled_pos_embed_sizes: tuple[int, ...] = ()
    blocks_to_swap: int = 0
    t5xxl_device: str | None = None  # e.g. "cpu": T5 stays there (its outputs are moved)
    t5xxl_dtype: torch.dtype | None = None
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    # what full-weight saves bundle beyond the encoders the base file held and those that trained
    save_clip: bool = False
    save_t5xxl: bool = False
    train_t5xxl: bool = False  # sd3_train.py --train_t5xxl: T5 is one of the trainable encoders


@dataclass
class SD3Models(LoadedModels):
    """SD3's modules plus what the family installs on them."""

    pos_embed: PosEmbedOptions | None = None  # the positional-embedding window (random crop, scaled tables)
    block_swap: BlockSwap | None = None  # installed by :meth:`SD3Family.place` with --blocks_to_swap


@functools.cache
def _tell_sampler_once(sampler: str) -> None:
    logger.info("SD3 uses the flow-matching Euler sampler (sampler %s is for SD1/SDXL)", sampler)


@dataclass
class SD3NoisyBatch(NoisyBatch):
    """A noisy batch plus where this step's positional-embedding window sits (None: centred)."""

    pos_crop: tuple[float, float] | None = None


class SD3Family(ModelFamily):
    """SD3 Medium, SD3.5 Medium and SD3.5 Large."""

    name = "sd3"
    latent_channels = 16
    size_multiple = 16  # VAE 8 x patch 2
    advised_size_multiple = 16
    title = "SD3"
    cache_suffix = "sd3"
    checkpoint_layouts = ("sd3",)
    default_network_module = "networks.lora_sd3"
    compiled_blocks = ("JointTransformerBlock", "SD3SingleTransformerBlock")
    default_image_size = 1024
    size_conditioning = False
    diffusers_lora_via_pipeline = True  # diffusers' SD3 LoRAs have separate q/k/v, ours are fused

    def __init__(self, options: SD3Options = SD3Options()):
        check_options(options)
        self.options = options

    # ----------------------------------------------------------------- models
    def load(self, name_or_path: str, dtype: torch.dtype, tokenizer_dir: str | None,
             device: torch.device | None = None) -> SD3Models:
        o = self.options
        parts = load_sd3_model(name_or_path, dtype, tokenizer_dir, o.clip_l, o.clip_g, o.t5xxl)
        if o.vae:
            parts.vae = load_vae(o.vae, dtype, self.latent_channels, device)
            parts.vae.register_to_config(scaling_factor=SD3_VAE_SCALE, shift_factor=SD3_VAE_SHIFT)
        if parts.t5xxl is None:
            if o.train_t5xxl:
                raise UserError(f"--train_t5xxl: {name_or_path} bundles no T5-XXL; give its file with --t5xxl")
            logger.warning("no T5-XXL in %s and no --t5xxl: training without T5 (its states are zeros)", name_or_path)
        pos_embed = None
        if o.pos_emb_random_crop_rate or o.scaled_pos_embed_sizes:
            pos_embed = PosEmbedOptions(parts.transformer.pos_embed, o.scaled_pos_embed_sizes)
        encoders = [parts.clip_l, parts.clip_g] + ([parts.t5xxl] if parts.t5xxl is not None else [])
        tokenizers = [parts.tokenizers["clip_l"], parts.tokenizers["clip_g"]] + (
            [parts.tokenizers["t5xxl"]] if parts.t5xxl is not None else [])
        return SD3Models(denoiser=parts.transformer, vae=parts.vae, text_encoders=encoders,
                         tokenizers=tokenizers, source=name_or_path, variant=parts.model_type(), pos_embed=pos_embed,
                         parts=parts)

    def place(self, models: LoadedModels, device: torch.device) -> None:
        """Everything to ``device``, except the swapped blocks (``--blocks_to_swap``) and T5 when
        ``--t5xxl_device``/``--t5xxl_dtype`` say otherwise."""
        o = self.options
        transformer = models.denoiser
        for name, child in transformer.named_children():
            if name != "transformer_blocks" or not o.blocks_to_swap:
                child.to(device)
        if o.blocks_to_swap:
            models.block_swap = install_block_swap(transformer, transformer.transformer_blocks, o.blocks_to_swap,
                                                 device)
        models.vae.to(device)
        for i, encoder in enumerate(models.text_encoders):
            if i == 2 and (o.t5xxl_device or o.t5xxl_dtype):
                encoder.to(torch.device(o.t5xxl_device) if o.t5xxl_device else device, o.t5xxl_dtype)
            else:
                encoder.to(device)

    def encode_images(self, models: LoadedModels, images: torch.Tensor, rng: SampleRNG | None = None) -> torch.Tensor:
        vae = models.vae
        dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        latents = dist.sample() if rng is None else dist.mean + dist.std * rng.randn(*dist.mean.shape[1:]).to(
            dist.mean)
        return (latents - SD3_VAE_SHIFT) * SD3_VAE_SCALE

    # ----------------------------------------------------------------- text
    def _clip(self, tokenizer, encoder, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokenizer(captions, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                           return_tensors="pt")
        mask = tokens.attention_mask.to(device) if self.options.apply_lg_attn_mask else None
        out = encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def encode_prompts(self, models: LoadedModels, captions: list[str], device: torch.device) -> dict:
        """``{"clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled", "t5"}``; the MMDiT's inputs are
        assembled from them in :meth:`denoise`."""
        return self.encode_prompt_parts(models, captions, device, list(range(len(models.text_encoders))))

    def encode_prompt_parts(self, models: LoadedModels, captions: list[str], device: torch.device,
                            encoders: list[int]) -> dict:
        """The keys of :meth:`encode_prompts` that the encoders at ``encoders`` give (0 CLIP-L,
        1 CLIP-G, 2 T5): each encoder's part of the conditioning is its own."""
        modules, tokenizers = models.text_encoders, models.tokenizers
        out = {}
        for i, part in enumerate(("clip_l", "clip_g")):
            if i in encoders:
                out[part], out[f"{part}_pooled"] = self._clip(tokenizers[i], modules[i], captions, device)
        if 2 in encoders and len(modules) > 2:
            tokens = tokenizers[2](captions, padding="max_length", max_length=self.options.t5xxl_max_token_length,
                                   truncation=True, return_tensors="pt")
            t5 = modules[2]
            where = t5.device  # T5 may live elsewhere (--t5xxl_device); its output comes back here
            mask = tokens.attention_mask.to(where) if self.options.apply_t5_attn_mask else None
            hidden = t5(tokens.input_ids.to(where), attention_mask=mask).last_hidden_state
            # in the CLIPs' output dtype: T5 may be kept in another one (--t5xxl_dtype)
            out["t5"] = hidden.to(device, out["clip_l"].dtype if "clip_l" in out else hidden.dtype)
        return out

    def text_encoder_settings(self, models: LoadedModels) -> dict:
        o = self.options
        return {"family": self.name, "encoders": [module_fingerprint(te) for te in models.text_encoders],
                "t5_tokens": o.t5xxl_max_token_length, "lg_mask": o.apply_lg_attn_mask,
                "t5_mask": o.apply_t5_attn_mask}

    def drop_conditioning(self, conditioning: dict, rng: SampleRNG) -> dict:
        """Per-encoder caption dropout: with each encoder's rate, a sample's output of that encoder
        (states and pooled part) is zeroed. Drawn from the samples' own generators."""
        o = self.options
        rates = {"clip_l": o.clip_l_dropout_rate, "clip_g": o.clip_g_dropout_rate, "t5": o.t5_dropout_rate}
        if not any(rates.values()):
            return conditioning
        out = dict(conditioning)
        for part, rate in rates.items():
            keep = (rng.rand() >= rate).to(next(iter(conditioning.values())).dtype)
            for key in (part, f"{part}_pooled"):
                if rate and key in out:
                    out[key] = out[key] * keep.view(-1, *([1] * (out[key].ndim - 1))).to(out[key].device)
        return out

    def _mmdit_inputs(self, models: LoadedModels, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states, pooled_projections) as SD3 expects them."""
        width = models.denoiser.config.joint_attention_dim
        lg = torch.cat([cond["clip_l"], cond["clip_g"]], dim=-1)
        lg = torch.nn.functional.pad(lg, (0, width - lg.shape[-1]))
        t5 = cond.get("t5")
        if t5 is None:  # no T5: zeros in its place, as kohya does
            t5 = lg.new_zeros(lg.shape[0], CLIP_TOKENS, width)
        return torch.cat([lg, t5.to(lg.dtype)], dim=1), torch.cat([cond["clip_l_pooled"], cond["clip_g_pooled"]], -1)

    # ----------------------------------------------------------------- training maths
    def make_noisy_batch(self, latents: torch.Tensor, rng: SampleRNG, timestep: int | None = None) -> NoisyBatch:
        o, opts = self.options.flow, self.options
        noise = rng.randn(*latents.shape[1:]).to(latents.dtype)
        crop = None
        if timestep is None:
            u = flow.density_sample(o.weighting_scheme, rng.rand(), rng.randn(), o.logit_mean, o.logit_std,
                                    o.mode_scale)
            timesteps = flow.timesteps_from_u(flow.shift_u(u, o.training_shift), o.min_timestep, o.max_timestep)
            if opts.pos_emb_random_crop_rate and rng.batch_uniform() < opts.pos_emb_random_crop_rate:
                crop = (rng.batch_uniform(), rng.batch_uniform())  # one window for the whole batch
        else:
            timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=latents.device)
        sigmas = flow.sigmas_from_timesteps(timesteps).to(latents.device)
        noisy, velocity = flow.noisy_and_velocity(latents, noise, sigmas)
        if opts.ip_noise_gamma:  # input perturbation: the input gets extra noise, the target does not
            gamma = opts.ip_noise_gamma * (rng.batch_uniform() if opts.ip_noise_gamma_random_strength else 1.0)
            s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
            noisy = noisy + s * gamma * rng.randn(*latents.shape[1:]).to(latents.dtype)
        return SD3NoisyBatch(noisy, timesteps.to(latents.device), velocity, pos_crop=crop)

    def validation_timesteps(self) -> list[int]:
        o = self.options.flow
        return [int(o.min_timestep + (o.max_timestep - o.min_timestep) * k / 5) for k in range(1, 5)]

    def denoise(self, models: LoadedModels, batch: NoisyBatch, conditioning: dict) -> torch.Tensor:
        context, pooled = self._mmdit_inputs(models, conditioning)
        pos_embed = getattr(models, "pos_embed", None)  # models loaded elsewhere may be plain LoadedModels
        with pos_embed.cropped(getattr(batch, "pos_crop", None)) if pos_embed else contextlib.nullcontext():
            return models.denoiser(hidden_states=batch.noisy_latents, encoder_hidden_states=context,
                                   pooled_projections=pooled, timestep=batch.timesteps.float()).sample

    def per_sample_loss(self, prediction: torch.Tensor, batch: NoisyBatch,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        o = self.options.flow
        sigmas = flow.sigmas_from_timesteps(batch.timesteps).to(prediction.device)
        s = sigmas.view(-1, *([1] * (prediction.ndim - 1)))
        # kohya's x0 preconditioning: |x_t - sigma v_pred - x0| = |sigma (v - v_pred)|
        c = torch.full_like(sigmas, o.huber_c)
        loss = elementwise_loss(s * prediction.float(), s * batch.target.float(), o.loss_type, c)
        return per_sample_mean(apply_mask(loss, mask)) * flow.loss_weighting(o.weighting_scheme, sigmas)

    # ----------------------------------------------------------------- sampling and metadata
    def pipeline(self, models: LoadedModels, sampler: str, kind: str, controlnet=None):
        if controlnet is not None:
            raise UserError("ControlNet is not available for SD3 models in this toolkit")
        if sampler and sampler.lower() not in ("euler", "k_euler"):
            _tell_sampler_once(sampler.lower())
        cls = {"txt2img": diffusers.StableDiffusion3Pipeline, "img2img": diffusers.StableDiffusion3Img2ImgPipeline,
               "inpaint": diffusers.StableDiffusion3InpaintPipeline}[kind]
        encoders, tokenizers = models.text_encoders, models.tokenizers
        return cls(transformer=models.denoiser,
                   scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=self.options.sample_shift),
                   vae=models.vae, text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1],
                   tokenizer_2=tokenizers[1], text_encoder_3=encoders[2] if len(encoders) > 2 else None,
                   tokenizer_3=tokenizers[2] if len(tokenizers) > 2 else None)

    def call_kwargs(self, models: LoadedModels, batch, device: torch.device) -> dict:
        context, pooled = self._mmdit_inputs(
            models, self.encode_prompts(models, list(batch.prompts) + list(batch.negatives), device))
        n = len(batch.prompts)
        return {"prompt_embeds": context[:n], "pooled_prompt_embeds": pooled[:n],
                "negative_prompt_embeds": context[n:], "negative_pooled_prompt_embeds": pooled[n:]}

    # ----------------------------------------------------------------- full-weight training
    def trainable_text_encoders(self, models: LoadedModels) -> list[torch.nn.Module]:
        """CLIP-L and CLIP-G; T5-XXL too with ``--train_t5xxl`` (as kohya's sd3_train.py)."""
        return list(models.text_encoders[:3 if self.options.train_t5xxl else 2])

    def freezable_blocks(self, models: LoadedModels) -> list[torch.nn.Module]:
        return list(models.denoiser.transformer_blocks)

    def save_problem(self, models: LoadedModels, save_as: str) -> str | None:
        if save_as == "ckpt":
            return "SD3 models are written as .safetensors single files or diffusers folders (no .ckpt)"
        return None

    def save_model(self, models: LoadedModels, path: str, dtype: torch.dtype | None, metadata: dict[str, str] | None,
                   as_folder: bool, trained_text_encoders: tuple[torch.nn.Module, ...] = ()) -> None:
        """A single file bundles the encoders the base file bundled, the trained ones (a trained
        CLIP brings its twin, as kohya writes them as a pair), and those --save_clip /
        --save_t5xxl ask for; encoders that came from separate files and did not change stay out,
        as kohya writes them (users keep loading them with --clip_l etc.). A diffusers folder holds
        every encoder, as the pipeline needs."""
        if as_folder:
            return super().save_model(models, path, dtype, metadata, as_folder)
        o, parts = self.options, models.parts
        names = set(parts.bundled)
        if o.save_clip or any(te is parts.clip_l or te is parts.clip_g for te in trained_text_encoders):
            names |= {"clip_l", "clip_g"}
        if o.save_t5xxl or any(te is parts.t5xxl for te in trained_text_encoders):
            names.add("t5xxl")
        save_sd3_single_file(path, parts, dtype, bundle_text_encoders=names, metadata=metadata)

    def metadata(self, models: LoadedModels) -> dict[str, str]:
        o = self.options
        return {
            **o.flow.metadata(),
            "ss_base_model_version": f"sd3_{models.variant}",
            "ss_t5xxl_max_token_length": str(o.t5xxl_max_token_length),
            "ss_apply_lg_attn_mask": str(o.apply_lg_attn_mask), "ss_apply_t5_attn_mask": str(o.apply_t5_attn_mask),
            "ss_clip_l_dropout_rate": str(o.clip_l_dropout_rate), "ss_clip_g_dropout_rate": str(o.clip_g_dropout_rate),
            "ss_t5_dropout_rate": str(o.t5_dropout_rate),
            "modelspec.architecture": f"stable-diffusion-3-{models.variant}",
            "modelspec.implementation": "https://github.com/Stability-AI/sd3.5",
            "modelspec.prediction_type": "flow",
        }


def check_options(options: SD3Options) -> None:
    """Contradictions in the SD3 flags, before anything is loaded."""
    problems = options.flow.problems()
    if not 0 <= options.pos_emb_random_crop_rate <= 1:
        problems.append(f"--pos_emb_random_crop_rate {options.pos_emb_random_crop_rate}: must be between 0 and 1")
    if options.blocks_to_swap < 0:
        problems.append("--blocks_to_swap must be 0 or more")
    for name in ("clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate"):
        if not 0 <= getattr(options, name) <= 1:
            problems.append(f"--{name} {getattr(options, name)}: must be between 0 and 1")
    if options.t5xxl_max_token_length < 1:
        problems.append("--t5xxl_max_token_length must be positive")
    if problems:
        raise UserError("; ".join(problems))
