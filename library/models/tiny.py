"""Tiny random-weight models with the real architectures' layouts, for tests and the quickstart.

They are narrow and shallow (about 2M parameters for SD1) but have the same module names as the
real models, so checkpoints written from them have the real key layout.
"""

from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from library.models import sd_keys
from library.models.sd3_loading import SD3_VAE_SCALE, SD3_VAE_SHIFT, SD3Components
from library.models.sd_infer import clip_heads
from library.models.sd_loading import SDComponents
from library.models.sdxl_loading import SDXLComponents
from library.models.tiny_tokenizer import build_tiny_clip_tokenizer, build_tiny_t5_tokenizer

TINY_SD1_UNET = {
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

# four levels like the real VAE, so latents are 1/8 of the image size as trainers assume
TINY_VAE = {
    "block_out_channels": (32, 32, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 64,
}


def tiny_clip_config(vocab_size: int, hidden: int = 32, layers: int = 2):
    """A CLIPTextConfig of CLIP-L's kind (quick_gelu, 77 positions) at test size."""
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37,
                          num_hidden_layers=layers, num_attention_heads=clip_heads(hidden),
                          max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=hidden,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=1)


def make_tiny_sd1(seed: int = 0) -> SDComponents:
    """Build a tiny SD1-architecture model (UNet, VAE, CLIP text encoder, tokenizer) with random weights."""

    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    unet = UNet2DConditionModel(**TINY_SD1_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(tiny_clip_config(len(tokenizer)))
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, v2=False)


TINY_SD2_UNET = {**TINY_SD1_UNET, "use_linear_projection": True, "cross_attention_dim": 64,
                 "attention_head_dim": [1, 1]}  # SD2 heads are 64 wide: max(1, channels // 64)


def make_tiny_sd2(seed: int = 0) -> SDComponents:
    """A tiny SD2-architecture model: linear projections, an OpenCLIP-like text tower (gelu, pad
    token "!"), plus the tensors a real SD2 file carries but the model does not use (its last text
    layer, text projection and logit scale), so it can be written as a real-layout single file."""

    torch.manual_seed(seed)
    tiny = build_tiny_clip_tokenizer()
    tokenizer = CLIPTokenizer(vocab=tiny.get_vocab(), merges=_merges_of(tiny), pad_token="!", model_max_length=77)
    vocab = len(tokenizer)
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_attention_heads=clip_heads(64),
               max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=vocab - 2,
               eos_token_id=vocab - 1, pad_token_id=0)
    full = CLIPTextModel(CLIPTextConfig(**cfg, num_hidden_layers=3))  # the file's tower: one layer more
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg, num_hidden_layers=2))
    state = full.state_dict()
    text_encoder.load_state_dict({k: v for k, v in state.items() if "layers.2." not in k}, strict=True)
    ldm = sd_keys.open_clip_to_ldm(state, {"text_projection": torch.randn(64, 32), "logit_scale": torch.tensor(4.6)})
    prefix = sd_keys.OPEN_CLIP_PREFIX
    unused = {k[len(prefix):]: v for k, v in ldm.items()
              if ".resblocks.2." in k or k.endswith(("text_projection", "logit_scale"))}
    unet = UNet2DConditionModel(**TINY_SD2_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, v2=True, unused=unused)


def _merges_of(tokenizer) -> list[tuple[str, str]]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


TINY_SDXL_UNET = {
    "sample_size": 8, "block_out_channels": (32, 64, 64), "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": [1, 1, 2], "cross_attention_dim": 32 + 64, "attention_head_dim": [1, 1, 1],
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8, "norm_num_groups": 32,
}


def make_tiny_sdxl(seed: int = 0):
    """A tiny SDXL-architecture model (3 levels with SDXL's block pattern, size conditioning, CLIP-L
    plus an OpenCLIP-G-like tower with projection) with random weights."""

    torch.manual_seed(seed)
    tok1, tok2 = tiny_clip_tokenizer_pair()
    vocab = len(tok1)
    te1 = CLIPTextModel(tiny_clip_config(vocab, hidden=32))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=clip_heads(64), max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0))
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    vae = AutoencoderKL(**{**TINY_VAE, "scaling_factor": 0.13025})
    for m in (unet, vae, te1, te2):
        m.eval().requires_grad_(False)
    return SDXLComponents(unet, vae, te1, te2, {"logit_scale": torch.tensor(4.6)}, tok1, tok2)


def tiny_clip_tokenizer_pair():
    """The tiny CLIP tokenizer twice: as CLIP-L's (pads with EOS) and as OpenCLIP-G's (pads with "!")."""
    tiny = build_tiny_clip_tokenizer()
    return tiny, CLIPTokenizer(vocab=tiny.get_vocab(), merges=_merges_of(tiny), pad_token="!", model_max_length=77)


TINY_SD3_MMDIT = {"sample_size": 16, "patch_size": 2, "in_channels": 16, "num_layers": 3, "attention_head_dim": 8,
                  "num_attention_heads": 4, "joint_attention_dim": 128, "caption_projection_dim": 32,
                  "pooled_projection_dim": 64, "out_channels": 16, "pos_embed_max_size": 32}


def make_tiny_sd3(seed: int = 0, sd35_medium: bool = False):
    """A tiny SD3-architecture model: MMDiT (SD3.5-Medium style with qk norm and dual attention when
    asked), a 16-channel VAE without quant convs, CLIP-L and CLIP-G with projections, and T5."""

    torch.manual_seed(seed)
    tok_l, tok_g = tiny_clip_tokenizer_pair()
    vocab = len(tok_l)
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)} if sd35_medium else {}
    transformer = SD3Transformer2DModel(**TINY_SD3_MMDIT, **extra)
    vae = AutoencoderKL(**{**TINY_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
                           "scaling_factor": SD3_VAE_SCALE, "shift_factor": SD3_VAE_SHIFT})
    clip_l = CLIPTextModelWithProjection(tiny_clip_config(vocab, hidden=32))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=clip_heads(64),
        max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, pad_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=200, d_model=128, d_kv=16, d_ff=64, num_layers=2, num_heads=8,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    for m in (transformer, vae, clip_l, clip_g, t5):
        m.eval().requires_grad_(False)

    return SD3Components(transformer, vae, clip_l, clip_g, t5,
                         {"clip_l": tok_l, "clip_g": tok_g, "t5xxl": build_tiny_t5_tokenizer()})


def controlnet_to_original_layout(controlnet, unet_config) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel's weights under the original ControlNet file's names
    (``control_model.input_hint_block.*``, ``zero_convs.*``, ``middle_block_out.*`` and the UNet's
    ldm names), to write the tiny files the ControlNet loader is tested on."""
    hint_blocks = len(controlnet.controlnet_cond_embedding.blocks)
    own, unet_like = {}, {}
    for key, value in controlnet.state_dict().items():
        head, _, rest = key.partition(".")
        if head == "controlnet_down_blocks":
            index, _, param = rest.partition(".")
            own[f"zero_convs.{index}.0.{param}"] = value
        elif head == "controlnet_mid_block":
            own[f"middle_block_out.0.{rest}"] = value
        elif head == "controlnet_cond_embedding":
            part, _, param = rest.partition(".")
            if part == "blocks":
                index, _, param = param.partition(".")
                own[f"input_hint_block.{2 * (int(index) + 1)}.{param}"] = value
            else:  # conv_in is the first conv, conv_out the last
                own[f"input_hint_block.{0 if part == 'conv_in' else 2 * (hint_blocks + 1)}.{param}"] = value
        else:
            unet_like[key] = value
    ldm = {k[len(sd_keys.UNET_PREFIX):]: v for k, v in sd_keys.unet_to_ldm(unet_like, unet_config).items()}
    return {f"control_model.{k}": v for k, v in {**ldm, **own}.items()}
