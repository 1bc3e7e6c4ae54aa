"""The model-family contract: everything in which SD1/SD2, SDXL and SD3 differ.

The trainer calls these methods with explicit arguments and never asks which family it has. A new
family is a new module implementing :class:`ModelFamily` plus an entry in ``families/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from library.models.checkpoints import Checkpoint, write_checkpoint, write_diffusers
from library.sampling.generate import GenBatch, run_batch
from library.utils.errors import UserError


@dataclass
class LoadedModels:
    """The modules of one model. ``denoiser`` is the UNet (or MMDiT)."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    source: str = ""
    #: what loading found out that the options did not say (SD: "sd1" / "sd2"; SD3: the model type,
    #: e.g. "medium", "5-large"); families keep no such state themselves
    variant: str = ""
    #: the library/models record the modules came from (same module objects): writing the whole
    #: model back (full training) goes through it
    parts: Any = None


@dataclass
class NoisyBatch:
    """What one training step feeds the denoiser and compares its output with."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    #: (B, 6) original h, w, crop top, left, target h, w of each sample (SDXL conditions on them)
    size_conditioning: torch.Tensor | None = None


class ModelFamily(ABC):
    """One model family (SD1/2, SDXL, SD3). Instances carry the family's options (v-prediction, ...)."""

    name: str
    latent_channels: int
    #: every training image size must be a multiple of this (the VAE's 8; SD3: times its patch size)
    size_multiple: int
    #: the multiple kohya advises for sizes and bucket steps (the denoiser's own downsampling); other
    #: multiples of ``size_multiple`` train as well and get a warning, as in kohya
    advised_size_multiple: int = 64
    #: the family's name in messages
    title: str = ""
    #: latent cache files are named ``<stem>_<WWWW>x<HHHH>_<cache_suffix>.npz`` (kohya's names)
    cache_suffix: str
    #: single-file layouts (see :func:`library.models.sd_loading.detect_layout`) this family loads
    checkpoint_layouts: tuple[str, ...] = ()
    #: what generation uses when not told otherwise
    default_network_module: str = "networks.lora"
    default_image_size: int = 512
    #: whether the denoiser takes original size / crop conditioning (gen_img's --ow/--oh/--ct/--cl)
    size_conditioning: bool = False
    diffusers_lora_via_pipeline: bool = False
    #: kohya's --negative_scale (a third, empty-prompt prediction per step) works with this family
    negative_scale_supported: bool = False
    #: the denoiser is a diffusers UNet on a DDPM schedule (Deep Shrink, Gradual Latent)
    unet_denoiser: bool = False
    #: the tensors of a textual inversion file, one per text encoder ("" = the file's only tensor);
    #: empty when the family does not take them
    textual_inversion_keys: tuple[str, ...] = ()
    #: class names of the denoiser's repeated blocks, each compiled on its own by --torch_compile
    compiled_blocks: tuple[str, ...] = ()
    #: diffusers has ControlNet pipelines for it and gen_img loads its ControlNets
    controlnet_supported: bool = False
    #: kohya's ControlNet-LLLite files are made for this family's UNet
    lllite_supported: bool = False
    #: kohya's --clip_vision_strength: the pooled text embedding can be replaced by an image's (SDXL)
    pooled_text_from_image: bool = False
    #: kohya's --replace_clip_l14_336: the one CLIP-L text encoder may be swapped (SD1)
    text_encoder_replaceable: bool = False

    @abstractmethod
    def load(self, name_or_path: str, dtype: torch.dtype, tokenizer_dir: str | None,
             device: torch.device | None = None) -> LoadedModels:
        """Load the model (raises UserError for a file of another family or a broken file); with
        ``device`` the weights are read straight onto it (``--lowram``) instead of into CPU memory."""

    def place(self, models: LoadedModels, device: torch.device) -> None:
        """Move the models to the training device. Families that keep some weights elsewhere (block
        swap, a text encoder on the CPU) override this."""
        for m in [models.denoiser, models.vae, *models.text_encoders]:
            m.to(device)

    @abstractmethod
    def encode_images(self, models: LoadedModels, images: torch.Tensor, rng=None) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> scaled latents the denoiser trains on (sampled from the
        VAE posterior with ``rng``'s per-sample draws when given)."""

    @abstractmethod
    def encode_prompts(self, models: LoadedModels, captions: list[str], device: torch.device) -> Any:
        """Captions -> the denoiser's text conditioning (gradients flow if text LoRA is on)."""

    @abstractmethod
    def text_encoder_settings(self, models: LoadedModels) -> dict:
        """What the prompt encoding depends on besides the caption (encoder weights' fingerprint and
        options); recorded in text-encoder caches so a changed setting is never served stale."""

    def drop_conditioning(self, conditioning: Any, rng) -> Any:
        """Training-time dropout of (possibly cached) text conditioning, drawn from ``rng``'s
        per-sample generators. Default: none (SD1/SDXL drop whole captions in the dataset)."""
        return conditioning

    @abstractmethod
    def make_noisy_batch(self, latents: torch.Tensor, rng, timestep: int | None = None) -> NoisyBatch:
        """Draw noise and timesteps from ``rng`` (a per-sample
        :class:`~library.maths.rng.SampleRNG`) and build the noisy input and the training target.
        ``timestep`` fixes the timestep (validation uses a few fixed ones)."""

    @abstractmethod
    def validation_timesteps(self) -> list[int]:
        """The fixed timesteps every validation batch is evaluated at."""

    @abstractmethod
    def denoise(self, models: LoadedModels, batch: NoisyBatch, conditioning: Any) -> torch.Tensor:
        """Run the denoiser on a noisy batch."""

    def target_from_prediction(self, prediction: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        """Turn a denoiser output into a training target (used by diff_output_preservation, whose
        target is the base model's own output). Families whose loss compares something other than
        the raw output override this."""
        return prediction

    @abstractmethod
    def per_sample_loss(self, prediction: torch.Tensor, batch: NoisyBatch,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of each sample, float32 (B,): loss type, pixel ``mask`` (B, 1, H, W) if given,
        and the family's loss weighting applied."""

    @abstractmethod
    def pipeline(self, models: LoadedModels, sampler: str, kind: str, controlnet=None):
        """A diffusers pipeline over ``models`` for ``kind`` (``txt2img``, ``img2img``, ``inpaint``)
        with the scheduler of the kohya sampler name ``sampler`` (and ``controlnet``, one diffusers
        ControlNetModel or a list, where ``controlnet_supported``)."""

    @abstractmethod
    def call_kwargs(self, models: LoadedModels, batch, device: torch.device) -> dict:
        """The pipeline-call arguments of a :class:`~library.sampling.generate.GenBatch` that depend on
        the family: our own prompt embeddings (so generation sees long prompts, weights and
        clip_skip as training does) and, for SDXL, the size conditioning."""

    def generate(self, models: LoadedModels, prompt, sampler: str, device: torch.device):
        """One PIL image for a :class:`~library.sampling.prompts.SamplePrompt` (training samples)."""
        seed = prompt.seed if prompt.seed is not None else torch.seed() % 2**32
        batch = GenBatch([prompt.prompt], [prompt.negative_prompt or ""], [seed], prompt.width, prompt.height,
                         prompt.steps, prompt.scale, sampler)
        return run_batch(self, models, batch, device)[0]

    @abstractmethod
    def metadata(self, models: LoadedModels) -> dict[str, str]:
        """Family-specific training metadata (``ss_base_model_version``, ``modelspec.architecture``, ...)."""

    def model_layout(self, models: LoadedModels) -> str:
        """The single-file layout these models are written in (library/models/checkpoints.py)."""
        return self.checkpoint_layouts[0]

    def freezable_blocks(self, models: LoadedModels) -> list[torch.nn.Module]:
        """The denoiser's repeated blocks in the order they run, for ``--num_last_block_to_freeze``
        (defined for SD3's MMDiT only, where kohya offers the flag)."""
        raise UserError(f"--num_last_block_to_freeze is defined for SD3's MMDiT, not for {self.title or self.name}")

    def block_lr_index(self, models: LoadedModels, parameter: str) -> int:
        """kohya's ``--block_lr`` index of a denoiser parameter (defined for SDXL only)."""
        raise UserError(f"--block_lr: per-block rates are defined for SDXL's UNet, not for {self.title or self.name}")

    def load_tokenizers(self, name_or_path: str, tokenizer_dir: str | None) -> list | None:
        """The model's tokenizers without its weights, for checks before loading (textual
        inversion's token checks); None where the family does not offer it."""
        return None

    def trainable_text_encoders(self, models: LoadedModels) -> list[torch.nn.Module]:
        """The text encoders a full-weight run trains with ``--train_text_encoder`` (all of them
        here; SD3 trains T5 only with ``--train_t5xxl``)."""
        return list(models.text_encoders)

    def encode_prompt_parts(self, models: LoadedModels, captions: list[str], device: torch.device,
                            encoders: list[int]) -> dict:
        """The part of :meth:`encode_prompts`'s conditioning that the text encoders at these
        indices give, so that frozen encoders' parts can be cached while the others train and run
        at every step. Families whose conditioning mixes the encoders cannot split it."""
        raise UserError(f"{self.title}: the text conditioning cannot be split by encoder, so the frozen encoders' "
                        "outputs cannot be cached while another one trains (cache all or none)")

    def save_problem(self, models: LoadedModels, save_as: str) -> str | None:
        """Why these models cannot be written as ``save_as`` (a ``--save_model_as`` value; checked
        before training), or None."""
        return None

    def save_model(self, models: LoadedModels, path: str, dtype: torch.dtype | None, metadata: dict[str, str] | None,
                   as_folder: bool, trained_text_encoders: tuple[torch.nn.Module, ...] = ()) -> None:
        """The whole model (its trained weights as they are now) as a single file in the family's
        original layout, or as a diffusers folder (``trained_text_encoders``: those that changed,
        for families whose files may leave unchanged ones out)."""
        checkpoint = Checkpoint(self.model_layout(models), models.parts, models.source)
        if as_folder:
            write_diffusers(checkpoint, path, dtype)
        else:
            write_checkpoint(checkpoint, path, dtype, metadata)
