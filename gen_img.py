"""Generate images from prompts with SD1.x/2.x, SDXL or SD3/SD3.5 models and LoRAs.

    python gen_img.py --ckpt model.safetensors --from_file prompts.txt --outdir out \
        --network_weights my_lora.safetensors --network_mul 0.8 --steps 30 --sampler euler_a

Prompt lines take kohya's options (``--n`` negative, ``--w``/``--h`` size, ``--d`` seeds, ``--l`` CFG
scale, ``--s`` steps, ``--ss`` sampler, ``--t`` img2img strength, ``--am`` LoRA strengths, ``--f``
file name, ...) or the ``positive|||negative`` form. A bad line is reported and skipped; the others
generate (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import sys

from library.args.common import add_attention_args, add_compile_args
from library.utils.errors import run_cli
from library.utils.log import setup_logging


def add_model_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--ckpt", required=True, help="single file (.safetensors/.ckpt), diffusers folder or hub id")
    family = m.add_mutually_exclusive_group()
    family.add_argument("--sdxl", action="store_true", help="the model is SDXL (detected from files anyway)")
    family.add_argument("--sd3", action="store_true", help="the model is SD3/SD3.5 (detected from files anyway)")
    m.add_argument("--v1", action="store_true", help="accepted for kohya compatibility (SD1 is detected)")
    m.add_argument("--v2", action="store_true", help="the model is SD2.x (checked against the file)")
    m.add_argument("--v_parameterization", action="store_true")
    m.add_argument("--zero_terminal_snr", action="store_true")
    m.add_argument("--vae", help="a separate VAE")
    m.add_argument("--clip_l")
    m.add_argument("--clip_g")
    m.add_argument("--t5xxl")
    m.add_argument("--t5xxl_max_token_length", type=int, default=256)
    m.add_argument("--flow_shift", type=float, default=3.0, help="SD3: shift of the flow-matching Euler sampler")
    m.add_argument("--tokenizer_cache_dir")
    m.add_argument("--replace_clip_l14_336", action="store_true",
                   help="SD1: use CLIP-L/14-336's text tower as the text encoder (from --clip_l14_336_model)")
    m.add_argument("--clip_l14_336_model",
                   help="hub id (cache or hub) or local folder of that model (openai/clip-vit-large-patch14-336)")
    precision = m.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="fp16 weights (CUDA)")
    precision.add_argument("--bf16", action="store_true", help="bf16 weights")
    m.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32")
    add_attention_args(m, sliced=False)
    add_compile_args(m)
    m.add_argument("--vae_slices", type=int, help="decode the batch's images one at a time (any value > 0)")
    m.add_argument("--vae_tiling", action="store_true", help="decode large images in tiles")
    m.add_argument("--vae_batch_size", type=float,
                   help="images decoded at a time (a fraction below 1: of the batch), to save memory")
    m.add_argument("--diffusers_xformers", action="store_true", help="the same as --xformers")
    m.add_argument("--opt_channels_last", action="store_true", help="the denoiser's weights in channels-last order")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts and sampling")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (may carry line options)")
    source.add_argument("--from_file", help="one prompt per line, # comments; 'positive|||negative' lines too")
    source.add_argument("--interactive", action="store_true",
                        help="read prompt lines from standard input, generating each as it is typed (Ctrl-D ends)")
    source.add_argument("--from_module", help="a Python file with kohya's get_prompter(args, pipe, networks)")
    g.add_argument("--prompter_module_args", help="free text for the --from_module prompter (it gets args)")
    g.add_argument("--shuffle_prompts", action="store_true",
                   help="a new prompt order each iteration (--n_iter), drawn from the seed")
    g.add_argument("--images_per_prompt", type=int, default=1)
    g.add_argument("--n_iter", type=int, default=1, help="repeat the whole prompt list")
    g.add_argument("--batch_size", type=int, default=1, help="images per pipeline call (same settings only)")
    g.add_argument("--seed", type=int, help="seed of the first image; the next images count up")
    g.add_argument("--iter_same_seed", action="store_true", help="all prompts of an iteration share a seed")
    g.add_argument("--W", type=int, help="width (512; 1024 for SDXL and SD3)")
    g.add_argument("--H", type=int, help="height (512; 1024 for SDXL and SD3)")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--scale", type=float, default=7.5, help="CFG scale")
    g.add_argument("--negative_scale", type=float,
                   help="SD1/SDXL: kohya's separate strength of the negative prompt (an extra empty-prompt "
                        "prediction per step; needs --scale above 1)")
    g.add_argument("--sampler", default="ddim", help="kohya sampler name (SD3 always uses flow-matching Euler)")
    g.add_argument("--negative_prompt", default="", help="negative prompt of lines without --n")
    g.add_argument("--ddim_eta", type=float, help="eta of the ddim sampler (0: deterministic; 1: like DDPM)")
    g.add_argument("--force_scheduler_zero_steps_offset", action="store_true",
                   help="steps_offset 0 in the sampler's schedule (SD1/SD2/SDXL; default 1 as SD was trained)")
    g.add_argument("--emb_normalize_mode", choices=("original", "abs", "none"), default="original",
                   help="after (word:1.2) weighting, restore each prompt's mean (original), mean of |values| "
                        "(abs), or nothing (none)")
    size = p.add_argument_group("SDXL size conditioning (per line --ow --oh --nw --nh --ct --cl)")
    for flag in ("original_width", "original_height", "original_width_negative", "original_height_negative",
                 "crop_top", "crop_left"):
        size.add_argument(f"--{flag}", type=int)
    g.add_argument("--clip_skip", type=int, help="SD1/SD2: use the n-th last text-encoder layer")
    g.add_argument("--max_embeddings_multiples", type=int, default=1,
                   help="SD1/SDXL: prompts up to 75 x N tokens (1, 2 or 3)")
    g.add_argument("--textual_inversion_embeddings", nargs="*", default=[],
                   help="SD1/SD2/SDXL embedding files; the file name is the word to use in prompts")


def add_lora_and_image_args(p: argparse.ArgumentParser) -> None:
    n = p.add_argument_group("LoRA")
    n.add_argument("--network_module", nargs="*", default=[], help="one per weights file (default per family)")
    n.add_argument("--network_weights", nargs="*", default=[], help="LoRA files (kohya or diffusers/PEFT form)")
    n.add_argument("--network_mul", nargs="*", type=float, default=[], help="strength of each LoRA (default 1)")
    n.add_argument("--network_merge", action="store_true", help="merge the LoRAs into the weights (faster)")
    n.add_argument("--network_merge_n_models", type=int,
                   help="merge only the first N LoRAs (their strengths fixed); the others stay adjustable by --am")
    n.add_argument("--network_args", nargs="*", default=[],
                   help="per LoRA file, 'key=value;key=value' for its --network_module (third-party modules)")
    n.add_argument("--network_show_meta", action="store_true", help="log each LoRA file's metadata")
    n.add_argument("--network_regional_mask_max_color_codes", type=int,
                   help="regional LoRA: read the --mask_path regions as colour codes 1..N (else R, G, B channels)")
    n.add_argument("--network_pre_calc", action="store_true",
                   help="add the LoRAs into the weights before each batch at its strengths (merged speed, --am "
                        "still works; keeps a copy of the changed weights)")
    i = p.add_argument_group("img2img, inpainting, highres fix")
    i.add_argument("--image_path", help="init image, or a folder of them (assigned to prompts in turn)")
    i.add_argument("--mask_path", help="inpainting mask (white = repaint), or a folder of them")
    i.add_argument("--strength", type=float, default=0.8, help="img2img strength")
    i.add_argument("--clip_vision_strength", type=float,
                   help="SDXL img2img: the prompt's pooled embedding becomes the init image's CLIP vision one "
                        "times this")
    i.add_argument("--clip_vision_model",
                   help="hub id (cache or hub) or local folder of the CLIP vision model with projection "
                        "(laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)")
    i.add_argument("--highres_fix_scale", type=float, help="first pass at this fraction of the size, e.g. 0.5")
    i.add_argument("--highres_fix_steps", type=int, default=28, help="steps of the second (img2img) pass")
    i.add_argument("--highres_fix_strength", type=float, default=0.7, help="strength of the second pass")
    i.add_argument("--highres_fix_save_1st", action="store_true", help="also save the first pass (<name>_1st.png)")
    i.add_argument("--highres_fix_latents_upscaling", action="store_true",
                   help="enlarge the first pass's latents (bilinear) instead of its decoded image")
    i.add_argument("--highres_fix_upscaler", help="a module with kohya's create_upscaler() for the enlargement")
    i.add_argument("--highres_fix_upscaler_args", help="'key=value;key=value' for create_upscaler")
    i.add_argument("--highres_fix_disable_control_net", action="store_true",
                   help="the highres fix's second pass without ControlNet")
    c = p.add_argument_group("ControlNet (SD1/SD2/SDXL) and ControlNet-LLLite (SDXL)")
    c.add_argument("--control_net_models", nargs="*", default=[],
                   help="ControlNet files (original layout) or diffusers folders")
    c.add_argument("--control_net_preps", nargs="*", default=[], help="per ControlNet: none, canny or canny_LOW_HIGH")
    c.add_argument("--control_net_multipliers", nargs="*", type=float, default=[], help="per ControlNet: strength")
    c.add_argument("--control_net_ratios", nargs="*", type=float, default=[],
                   help="per ControlNet: the fraction of the steps (from the first) it guides")
    c.add_argument("--control_net_lllite_models", nargs="*", default=[],
                   help="SDXL: kohya's ControlNet-LLLite files (they take the per-ControlNet flags above)")
    c.add_argument("--guide_image_path", help="the guide image, or a folder of them (assigned to prompts in turn)")


def add_shrink_and_noise_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("Deep Shrink (SD1/SD2/SDXL; per line --dsd1 --dst1 --dsd2 --dst2 --dsr)")
    d.add_argument("--ds_depth_1", type=int, help="shrink the UNet's hidden states entering this input block "
                                                  "(kohya's depth; 3 is usual) while t >= --ds_timesteps_1")
    d.add_argument("--ds_timesteps_1", type=int, default=650)
    d.add_argument("--ds_depth_2", type=int, help="a second depth, for --ds_timesteps_2 <= t < --ds_timesteps_1")
    d.add_argument("--ds_timesteps_2", type=int, default=650)
    d.add_argument("--ds_ratio", type=float, default=0.5, help="the shrink factor")
    g = p.add_argument_group("Gradual Latent (SD1/SD2/SDXL, euler_a; per line --glt --glr --gle --gls --glsn --glus)")
    g.add_argument("--gradual_latent_timesteps", type=float,
                   help="start from a smaller latent and grow it once t is below this (try 750)")
    g.add_argument("--gradual_latent_ratio", type=float, default=0.5, help="the first size, as a fraction")
    g.add_argument("--gradual_latent_ratio_step", type=float, default=0.125, help="growth per enlargement")
    g.add_argument("--gradual_latent_every_n_steps", type=int, default=3, help="steps between enlargements")
    g.add_argument("--gradual_latent_s_noise", type=float, default=1.0, help="scale of the noise added when growing")
    g.add_argument("--gradual_latent_unsharp_params",
                   help="unsharp mask after growing: ksize,sigma,strength[,target_x]")
    n = p.add_argument_group("start-noise tricks (text-to-image)")
    n.add_argument("--pyramid_noise_prob", type=float, help="chance that an image starts from pyramid noise")
    n.add_argument("--pyramid_noise_discount_range", type=float, nargs=2, metavar=("MIN", "MAX"), help="0.3 0.8")
    n.add_argument("--noise_offset_prob", type=float, help="chance that an image's start noise gets an offset")
    n.add_argument("--noise_offset_range", type=float, nargs=2, metavar=("MIN", "MAX"), help="-0.1 0.1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate images with SD1/SD2, SDXL or SD3 models and LoRAs")
    add_model_args(p)
    add_prompt_args(p)
    add_lora_and_image_args(p)
    add_shrink_and_noise_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--outdir", required=True)
    o.add_argument("--sequential_file_name", action="store_true", help="im_000001.png, im_000002.png, ...")
    o.add_argument("--use_original_file_name", action="store_true",
                   help="with --image_path: name each image after its init image")
    o.add_argument("--no_preview", action="store_true",
                   help="accepted for kohya commands: this script never opens preview windows")
    o.add_argument("--console_log_level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.console_log_level)
    # imported after parsing, so --help and argument errors do not wait for torch and diffusers
    from library.generation.config import build_gen_config
    from library.generation.main import generate_all

    failures = generate_all(build_gen_config(args))
    if failures:
        print("\n".join(f"error: {msg}" for msg in failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
