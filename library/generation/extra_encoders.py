"""Two of kohya's gen_img options that bring in another CLIP model from the hub.

* ``--clip_vision_strength s`` (SDXL img2img): the positive prompt's pooled text embedding is
  replaced by the init image's CLIP-bigG vision embedding times s (kohya's rule, as ComfyUI's),
  so the image steers the global conditioning. The model is kohya's
  ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`` (``--clip_vision_model`` takes another hub id or a
  local folder with its image-processor config).
* ``--replace_clip_l14_336`` (SD1): the text encoder is replaced by the text tower of
  ``openai/clip-vit-large-patch14-336`` (``--clip_l14_336_model`` for another id or a folder).

Both load through transformers' ``from_pretrained``: a hub id comes from the Hugging Face cache or
the hub, a folder is read as it is.
"""

from __future__ import annotations

import torch
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPVisionModelWithProjection

from library.utils.errors import UserError

CLIP_VISION_BIG_G = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
CLIP_L14_336 = "openai/clip-vit-large-patch14-336"


def _from_pretrained(cls, name: str, flag: str, **kwargs):
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{flag} {name}: could not load it ({str(exc).splitlines()[0]}); give a local folder or a "
                        "hub id that is in the Hugging Face cache (or reachable)") from exc


class ClipVisionPooled:
    """The SDXL pooled embedding from an image (``--clip_vision_strength``)."""

    def __init__(self, name: str, strength: float, device: torch.device, dtype: torch.dtype):
        name = name or CLIP_VISION_BIG_G
        self.model = _from_pretrained(CLIPVisionModelWithProjection, name, "--clip_vision_model")
        self.model.to(device, dtype).eval().requires_grad_(False)
        self.processor = _from_pretrained(CLIPImageProcessor, name, "--clip_vision_model")
        self.strength, self.device = strength, device

    @torch.no_grad()
    def __call__(self, images: list, pooled: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        embeds = self.model(pixel_values=pixels.to(self.device, self.model.dtype)).image_embeds * self.strength
        if embeds.shape != pooled.shape:
            raise UserError(f"--clip_vision_strength: the vision model's embeddings are {tuple(embeds.shape[1:])} "
                            f"wide, this model's pooled text is {tuple(pooled.shape[1:])} (an SDXL model needs "
                            "CLIP bigG's 1280)")
        return embeds.to(pooled.dtype)


def replace_text_encoder(model_name: str | None, models, dtype: torch.dtype) -> None:
    """``--replace_clip_l14_336``: CLIP-L/14-336's text tower (``--clip_l14_336_model``, default the
    OpenAI repo) in place of the SD1 text encoder."""
    name = model_name or CLIP_L14_336
    new = _from_pretrained(CLIPTextModel, name, "--clip_l14_336_model", torch_dtype=dtype)
    old = models.text_encoders[0]
    if new.config.hidden_size != old.config.hidden_size:
        raise UserError(f"--replace_clip_l14_336: {name} is {new.config.hidden_size} wide, this "
                        f"model's text encoder {old.config.hidden_size} (it replaces SD1's CLIP-L)")
    models.text_encoders[0] = new.to(next(old.parameters()).device).eval().requires_grad_(False)
