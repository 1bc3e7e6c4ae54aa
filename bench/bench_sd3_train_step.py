"""Benchmark: SD3.5-Medium LoRA training step time and peak memory, with and without block swap (#7).

SD3.5-Medium-architecture MMDiT (24 blocks, hidden 1536, qk norm, dual attention in blocks 0-12)
with random weights stored in bf16, 512 px, batch 1, LoRA dim 16 on the MMDiT, AdamW, bf16 mixed
precision, cached latents and text-encoder outputs. The text encoders are cut to one layer each
(with the real output widths): their outputs are cached before the first step, so they do not
change the step. Each mode runs the real trainer in its own process:

  plain  every block in "device" memory
  swap   --blocks_to_swap N (default 12)

On a CPU "device" and host memory are the same RAM, so swapping cannot lower peak RSS here; what
this measures is the cost of the exchanges (real copies) and the number of blocks resident at
peak, which on a GPU is what bounds device memory: (24 - N) blocks instead of 24.

    .venv/bin/python bench/bench_sd3_train_step.py           # full size (about 10 minutes, 2 CPU cores)
    .venv/bin/python bench/bench_sd3_train_step.py --tiny    # smoke (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_train_step import print_result, run_children, train_timed  # noqa: E402

SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
               "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
               "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
               "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13))}


def build_models(tiny: bool):
    """SD3.5-Medium-size MMDiT (bf16) with one-layer encoders of the real widths, or the tiny SD3.5M."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from library.models.sd3_loading import SD3_VAE_SCALE, SD3_VAE_SHIFT, SD3Components
    from library.models.sd_infer import shipped_config
    from library.models.tiny import make_tiny_sd3, tiny_clip_tokenizer_pair
    from library.models.tiny_tokenizer import build_tiny_t5_tokenizer

    if tiny:
        return make_tiny_sd3(0, sd35_medium=True)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    transformer = SD3Transformer2DModel(**SD35_MEDIUM)
    vae = AutoencoderKL(**{**shipped_config("sd15_vae"), "latent_channels": 16, "use_quant_conv": False,
                           "use_post_quant_conv": False, "scaling_factor": SD3_VAE_SCALE,
                           "shift_factor": SD3_VAE_SHIFT})
    tok_l, tok_g = tiny_clip_tokenizer_pair()
    vocab = len(tok_l)
    common = dict(vocab_size=vocab, max_position_embeddings=77, num_hidden_layers=1, bos_token_id=vocab - 2,
                  eos_token_id=vocab - 1)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                        projection_dim=768, hidden_act="quick_gelu", **common))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                        num_attention_heads=20, projection_dim=1280,
                                                        hidden_act="gelu", pad_token_id=0, **common))
    t5 = T5EncoderModel(T5Config(vocab_size=200, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    torch.set_default_dtype(torch.float32)
    parts = SD3Components(transformer, vae, clip_l, clip_g, t5,
                          {"clip_l": tok_l, "clip_g": tok_g, "t5xxl": build_tiny_t5_tokenizer()})
    for m in (transformer, vae, clip_l, clip_g, t5):
        m.to(torch.bfloat16).eval().requires_grad_(False)
    return parts


def run(parts, size: int, steps: int, warmup: int, swap: int) -> tuple[list[float], int]:
    """The real trainer; per-step times after warm-up and the most blocks resident at once."""
    from library.families.sd3 import SD3Family, SD3Models, SD3Options

    loaded = []

    class InMemorySD3(SD3Family):
        def load(self, name_or_path, dtype, tokenizer_dir, device=None):
            loaded.append(SD3Models(parts.transformer, parts.vae, [parts.clip_l, parts.clip_g, parts.t5xxl],
                                    [parts.tokenizers[k] for k in ("clip_l", "clip_g", "t5xxl")], source="random",
                                    variant=parts.model_type()))
            return loaded[-1]

    family = InMemorySD3(SD3Options(blocks_to_swap=swap, t5xxl_max_token_length=256))
    times = train_timed(family, size, steps, warmup, ["--network_module", "networks.lora_sd3", "--mixed_precision",
                                                      "bf16", "--cache_latents", "--cache_text_encoder_outputs"])
    swap_of = loaded[-1].block_swap
    resident = swap_of.max_resident if swap_of else parts.transformer.config.num_layers
    return times, resident


def child(tiny: bool, size: int, steps: int, warmup: int, swap: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    times, resident = run(build_models(tiny), size, steps, warmup, swap)
    print_result(times, blocks_to_swap=swap, max_blocks_resident=resident)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny SD3.5-Medium-layout model (smoke test)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--blocks_to_swap", type=int, default=12)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        child(a.tiny, a.size, a.steps, a.warmup, a.child)
        return
    child_args = ["--size", str(a.size), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    runs = run_children(__file__, ["0", str(a.blocks_to_swap)], child_args + (["--tiny"] if a.tiny else []))
    results = {"plain": runs["0"], "swap": runs[str(a.blocks_to_swap)]}
    print(f"model: {'tiny SD3.5M-layout' if a.tiny else 'SD3.5-Medium-size'} MMDiT (bf16 weights), {a.size}px, "
          "batch 1, LoRA dim 16 on the MMDiT, AdamW, bf16 mixed precision, cached latents and text outputs")
    for name, r in results.items():
        print(f"{name:6s} (blocks_to_swap {r['blocks_to_swap']:2d}): {r['median_s']:.3f} s/step (median of "
              f"{r['steps']}), peak RSS {r['peak_rss_gib']:.2f} GiB, "
              f"at most {r['max_blocks_resident']} blocks resident")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
