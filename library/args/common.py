"""argparse groups shared by the training scripts. Flags and defaults follow kohya-ss/sd-scripts.

Dataset flags default to None so that a dataset config's values take precedence over defaults
(but not over flags the user gave).
"""

from __future__ import annotations

import argparse
import difflib

from library.optim.optimizers import SCHEDULERS
from library.sampling.samplers import SAMPLER_NAMES


def scheduler_name(text: str) -> str:
    """``--lr_scheduler``: one of kohya's names, or (as kohya allows) a ``module.Class`` path."""
    if text in SCHEDULERS or "." in text:
        return text
    close = difflib.get_close_matches(text, SCHEDULERS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise argparse.ArgumentTypeError(f"'{text}' is not a scheduler{hint}: choose from {', '.join(SCHEDULERS)}, "
                                     "or give module.Class")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path",
                   help="single-file checkpoint (.safetensors/.ckpt), diffusers folder, or hub id")
    g.add_argument("--v2", action="store_true",
                   help="the base model is SD2.x (SD2 is detected; this flag is checked against it)")
    g.add_argument("--v_parameterization", action="store_true", help="train with v-prediction (SD2.x 768-v models)")
    g.add_argument("--tokenizer_cache_dir", help="folder with the tokenizer files, for offline single-file loading")
    g.add_argument("--vae", help="a separate VAE: single file (original or diffusers layout) or diffusers folder")
    g.add_argument("--clip_skip", type=int, help="use the output of the n-th last text-encoder layer (2 = penultimate)")
    g.add_argument("--max_token_length", type=int, choices=[75, 150, 225],
                   help="caption length in tokens (default 75); longer captions are encoded in windows of 75")
    g.add_argument("--weighted_captions", action="store_true",
                   help="AUTOMATIC1111 emphasis in captions: (word), [word], (word:1.3)")


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset_config", help="dataset config (.toml or .json) in kohya's format")
    g.add_argument("--train_data_dir", help="folder of '<repeats>_<class tokens>' image folders")
    g.add_argument("--reg_data_dir", help="folder of '<repeats>_<class tokens>' regularization image folders")
    g.add_argument("--in_json", help="fine-tuning metadata (JSON/JSONL) for the images in --train_data_dir")
    g.add_argument("--dataset_repeats", type=int, default=1, help="repeats of the --in_json images")
    g.add_argument("--resize_interpolation",
                   choices=["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"],
                   help="resize filter (default: area when shrinking, lanczos when enlarging)")
    g.add_argument("--resolution", help="training resolution: 'N' or 'W,H'")
    g.add_argument("--train_batch_size", type=int, help="batch size (default 1)")
    g.add_argument("--enable_bucket", action="store_true", default=None, help="aspect-ratio bucketing")
    g.add_argument("--min_bucket_reso", type=int, help="smallest bucket side (default 256)")
    g.add_argument("--max_bucket_reso", type=int, help="largest bucket side (default 1024)")
    g.add_argument("--bucket_reso_steps", type=int, help="bucket side granularity (default 64)")
    g.add_argument("--bucket_no_upscale", action="store_true", default=None, help="never enlarge images for buckets")
    g.add_argument("--flip_aug", action="store_true", default=None, help="random horizontal flips")
    g.add_argument("--color_aug", action="store_true", default=None, help="random hue/gamma changes (not cacheable)")
    g.add_argument("--random_crop", action="store_true", default=None,
                   help="random instead of centred crop to the bucket (not cacheable)")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")
    g.add_argument("--masked_loss", action="store_true",
                   help="weight the loss by mask images (subsets with conditioning_data_dir, red channel)")
    g.add_argument("--alpha_mask", action="store_true", default=None,
                   help="weight the loss by each image's alpha channel (the subset key alpha_mask)")
    g.add_argument("--strict_dataset", action="store_true",
                   help="stop on an unreadable image or caption instead of skipping it with a warning")
    g.add_argument("--cache_latents", action="store_true", help="encode every image once before training (in RAM)")
    g.add_argument("--cache_latents_to_disk", action="store_true",
                   help="also keep them in <image>_<WxH>_sd.npz files, reused while still valid")
    g.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE call when caching latents")
    g.add_argument("--cache_text_encoder_outputs", action="store_true",
                   help="encode every (fixed) caption once; needs --network_train_unet_only and no caption "
                        "randomisation")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                   help="also keep them in <image>_sd_te.npz files, reused while still valid")
    g.add_argument("--text_encoder_batch_size", type=int, default=8, help="captions per text-encoder call when caching")
    g.add_argument("--max_data_loader_n_workers", type=int, default=0, help="data-loader worker processes")
    g.add_argument("--validation_split", type=float, help="share of each subset held out for validation (0-1)")
    g.add_argument("--validation_seed", type=int, help="seed of the validation split and noise (default --seed)")
    g.add_argument("--validate_every_n_steps", type=int, help="validation loss every N steps")
    g.add_argument("--validate_every_n_epochs", type=int,
                   help="validation loss every N epochs (default: every epoch when there is a validation set)")
    g.add_argument("--max_validation_steps", type=int, help="at most N validation batches per pass")
    g.add_argument("--debug_dataset", action="store_true",
                   help="print every batch as it will be trained (bucket, sizes, captions), then exit; no model "
                        "is loaded")
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="keep workers between epochs")


def add_caption_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("captions")
    g.add_argument("--caption_extension", "--caption_extention",  # kohya's old misspelling still works
                   help="caption file extension (default .caption)")
    g.add_argument("--shuffle_caption", action="store_true", default=None, help="shuffle comma-separated tags")
    g.add_argument("--keep_tokens", type=int, help="keep the first N tags in place when shuffling")
    g.add_argument("--caption_dropout_rate", type=float, help="drop the whole caption with this probability")
    g.add_argument("--caption_dropout_every_n_epochs", type=int, help="drop every caption in every N-th epoch")
    g.add_argument("--caption_tag_dropout_rate", type=float, help="drop each (flexible) tag with this probability")
    g.add_argument("--caption_separator", help="tag separator (default ',')")
    g.add_argument("--keep_tokens_separator", help="marks the end of the fixed tags (e.g. '|||')")
    g.add_argument("--secondary_separator", help="glues tags that move together; replaced by the separator")
    g.add_argument("--caption_prefix", help="text put before every caption")
    g.add_argument("--caption_suffix", help="text put after every caption")
    g.add_argument("--enable_wildcard", action="store_true", default=None,
                   help="{a|b} choices and one random line of multi-line captions")
    g.add_argument("--token_warmup_min", type=int, help="tags kept at the start of token warm-up (default 1)")
    g.add_argument("--token_warmup_step", type=float, help="warm-up length: steps, or a ratio < 1 of all steps")


def add_training_args(p: argparse.ArgumentParser, save_formats: tuple[str, ...] = ("safetensors", "ckpt", "pt"),
                      network: bool = True) -> None:
    """The shared training flags; ``save_formats`` are the --save_model_as choices, ``network``
    adds the flags only a network run has."""
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", help="where models are saved (required)")
    g.add_argument("--output_name", default="last", help="base name of saved files")
    g.add_argument("--save_model_as", default="safetensors", choices=list(save_formats))
    g.add_argument("--save_precision", choices=["float", "fp16", "bf16"], help="dtype of saved weights")
    if network:
        g.add_argument("--save_lora_format", choices=["kohya", "diffusers"], default="kohya",
                       help="diffusers: the final LoRA is also written as <name>-diffusers/ (pytorch_lora_weights."
                            "safetensors for load_lora_weights, adapter_config.json + adapter_model.safetensors for "
                            "PEFT)")
    g.add_argument("--save_every_n_epochs", type=int, help="save every N epochs (name-000001.safetensors)")
    g.add_argument("--save_every_n_steps", type=int, help="save every N steps (name-step00000100.safetensors)")
    g.add_argument("--save_n_epoch_ratio", type=int,
                   help="save about N times in the run: every floor(epochs / N) epochs "
                        "(overrides --save_every_n_epochs)")
    g.add_argument("--save_last_n_epochs", type=int, help="keep only the newest N epoch saves")
    g.add_argument("--save_last_n_steps", type=int, help="keep only the step saves of the last N steps")
    g.add_argument("--save_last_n_epochs_state", type=int, help="like --save_last_n_epochs, for state folders")
    g.add_argument("--save_last_n_steps_state", type=int, help="like --save_last_n_steps, for state folders")
    g.add_argument("--save_state", action="store_true",
                   help="with every save, also write a state folder (<name>-...-state) for --resume")
    g.add_argument("--save_state_on_train_end", action="store_true", help="write <name>-state at the end")
    g.add_argument("--resume", help="continue exactly from a state folder, or 'latest' (newest in --output_dir)")
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--max_train_epochs", type=int, help="overrides --max_train_steps")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    _add_speed_args(g)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--full_fp16", action="store_true",
                   help="keep the trained weights themselves in fp16 (GPU, fp16 mixed precision)")
    g.add_argument("--full_bf16", action="store_true",
                   help="keep the trained weights themselves in bf16 (bf16 mixed precision)")
    g.add_argument("--fp8_base", action="store_true", help="store the base model's linear/conv weights in fp8")
    g.add_argument("--fp8_base_unet", action="store_true",
                   help="fp8 for the UNet only (text encoders keep their dtype)")
    g.add_argument("--lowram", action="store_true",
                   help="read the model's weights straight onto the GPU instead of into CPU memory first")
    add_attention_args(g, sliced=True)
    g.add_argument("--seed", type=int, help="random seed (random if not given)")
    g.add_argument("--ddp_timeout", type=int,
                   help="multi-process: minutes to wait for the other processes (default 30)")
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                   help="a DistributedDataParallel option; this trainer averages gradients itself (nothing to tune)")
    g.add_argument("--ddp_static_graph", action="store_true",
                   help="a DistributedDataParallel option; this trainer averages gradients itself (nothing to tune)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    g.add_argument("--fused_backward_pass", action="store_true",
                   help="apply Adafactor to each tensor during the backward pass (less memory; clipping per tensor)")
    g.add_argument("--no_half_vae", action="store_true",
                   help="keep the VAE in float32 under fp16/bf16 mixed precision (SDXL's VAE overflows in fp16)")
    g.add_argument("--no_metadata", action="store_true", help="store only the minimum metadata in saved LoRAs")
    g.add_argument("--training_comment", help="stored as ss_training_comment")
    for key in ("title", "author", "description", "license", "tags", "usage_hint", "trigger_phrase", "merged_from",
                "preprocessor"):
        g.add_argument(f"--metadata_{key}", help=f"modelspec.{key} in the saved file")


def add_attention_args(group, sliced: bool) -> None:
    """``--sdpa`` (the default) / ``--xformers`` (and ``--mem_eff_attn`` where sliced attention applies)."""
    attn = group.add_mutually_exclusive_group()
    attn.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    attn.add_argument("--xformers", action="store_true", help="xformers attention (CUDA GPU and pip install xformers)")
    if sliced:
        attn.add_argument("--mem_eff_attn", action="store_true", help="sliced attention: less memory, slower")


def add_noise_loss_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("noise and loss (DDPM models)")
    g.add_argument("--min_timestep", type=int, default=0, help="lowest training timestep (inclusive)")
    g.add_argument("--max_timestep", type=int, default=1000, help="highest training timestep (exclusive)")
    g.add_argument("--noise_offset", type=float, help="noise offset strength, e.g. 0.05")
    g.add_argument("--noise_offset_random_strength", action="store_true", help="offset drawn from U(0, offset)")
    g.add_argument("--adaptive_noise_scale", type=float, help="add this times |latent mean| to the offset")
    g.add_argument("--multires_noise_iterations", type=int, help="pyramid noise levels, e.g. 6")
    g.add_argument("--multires_noise_discount", type=float, default=0.3, help="weight decay per pyramid level")
    g.add_argument("--ip_noise_gamma", type=float, help="input perturbation strength, e.g. 0.1")
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true", help="gamma drawn from U(0, gamma)")
    g.add_argument("--zero_terminal_snr", action="store_true", help="rescale the schedule to zero terminal SNR")
    g.add_argument("--min_snr_gamma", type=float, help="min-SNR loss weighting, e.g. 5")
    g.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                   help="scale v-prediction loss like epsilon loss (needs --v_parameterization)")
    g.add_argument("--v_pred_like_loss", type=float, help="add a v-prediction-like loss with this weight")
    g.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting")
    g.add_argument("--loss_type", default="l2", choices=["l2", "l1", "huber", "smooth_l1"])
    g.add_argument("--huber_schedule", default="snr", choices=["snr", "exponential", "constant"])
    g.add_argument("--huber_c", type=float, default=0.1, help="Huber parameter c0")
    g.add_argument("--huber_scale", type=float, default=1.0, help="Huber scale (exponential/constant schedules)")


def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer_type", default="AdamW",
                   help="AdamW (default), AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, SGDNesterov, SGDNesterov8bit, "
                        "DAdaptation/DAdaptAdam/..., Prodigy, Adafactor, AdamWScheduleFree, RAdamScheduleFree, "
                        "SGDScheduleFree, or module.Class")
    g.add_argument("--optimizer_args", nargs="*", default=[], help="key=value optimizer arguments")
    # kohya's older switches for two optimizers
    g.add_argument("--use_8bit_adam", dest="optimizer_type", action="store_const", const="AdamW8bit",
                   help="the same as --optimizer_type AdamW8bit")
    g.add_argument("--use_lion_optimizer", dest="optimizer_type", action="store_const", const="Lion",
                   help="the same as --optimizer_type Lion")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--unet_lr", type=float)
    g.add_argument("--text_encoder_lr", type=float, nargs="+",
                   help="text-encoder learning rate; two values for SDXL's two encoders (te1 te2)")
    g.add_argument("--lr_scheduler", default="constant", type=scheduler_name,
                   help=f"{', '.join(SCHEDULERS)}, or module.Class (as --lr_scheduler_type)")
    g.add_argument("--lr_warmup_steps", default="0", help="warm-up steps: a count, a ratio < 1 of all steps, or N%%")
    g.add_argument("--lr_decay_steps", default="0", help="decay steps of warmup_stable_decay (count, ratio or N%%)")
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float, help="final lr ratio (cosine_with_min_lr, wsd)")
    g.add_argument("--lr_scheduler_type", help="any scheduler class: module.Class (or a torch.optim.lr_scheduler name)")
    g.add_argument("--lr_scheduler_args", nargs="*", default=[], help="key=value arguments for the scheduler")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    g.add_argument("--lr_scheduler_power", type=float, default=1.0)
    g.add_argument("--initial_step", type=int,
                   help="start counting at this step (of all epochs) without a state folder: names, logs, the LR "
                        "schedule and the end of the run continue from it; overrides --initial_epoch")
    g.add_argument("--initial_epoch", type=int, help="start at this epoch (1 = the first), as --initial_step does")
    g.add_argument("--skip_until_initial_step", action="store_true",
                   help="with --initial_step/--initial_epoch: also start the data where that step was (the same "
                        "batches the uninterrupted run would train next); without it the epoch starts from its first "
                        "batch, as in kohya")


def add_network_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network")
    g.add_argument("--network_module", default="networks.lora",
                   help="plug-in module (networks.lora, lycoris.kohya, ...)")
    g.add_argument("--network_dim", type=int, help="rank (default 4 for networks.lora)")
    g.add_argument("--network_alpha", type=float, help="alpha (default 1); scale = alpha / dim")
    g.add_argument("--network_args", nargs="*", default=[], help="key=value arguments for the network module")
    g.add_argument("--network_weights", help="start from this LoRA file")
    g.add_argument("--dim_from_weights", action="store_true",
                   help="build the network with the ranks and alphas of --network_weights (--network_dim is not used)")
    g.add_argument("--network_dropout", type=float,
                   help="dropout on each LoRA module's down-projection output while training (e.g. 0.1)")
    g.add_argument("--scale_weight_norms", type=float,
                   help="max-norm regularisation: after each step, scale every module whose update norm exceeds "
                        "this back to it (e.g. 1.0); logs max_norm/keys_scaled and the key norms")
    g.add_argument("--base_weights", nargs="*", default=[],
                   help="LoRA files merged into the base model before training (the trained network goes on top)")
    g.add_argument("--base_weights_multiplier", type=float, nargs="*", default=[],
                   help="strength of each --base_weights file (default 1.0 each)")
    g.add_argument("--network_train_unet_only", action="store_true")
    g.add_argument("--network_train_text_encoder_only", action="store_true")
    # kohya's LoRA+ flags (the kohya_ss GUI writes these); they are network_args of the same names
    for part in ("", "unet_", "text_encoder_"):
        g.add_argument(f"--loraplus_{part}lr_ratio", type=float,
                       help=f"LoRA+: lora_up of the {part.rstrip('_') or 'whole network'} learns at this many "
                            "times its rate")


def add_sample_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sample images")
    g.add_argument("--sample_prompts",
                   help="prompt file (.txt with --n --w --h --d --l --s --ss, .toml, .json)")
    g.add_argument("--sample_every_n_steps", type=int)
    g.add_argument("--sample_every_n_epochs", type=int)
    g.add_argument("--sample_at_first", action="store_true", help="also sample before training")
    g.add_argument("--sample_sampler", default="ddim", choices=SAMPLER_NAMES)


def add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--logging_dir", help="TensorBoard logs go to <logging_dir>/<log_prefix><timestamp>")
    g.add_argument("--log_prefix", default="")
    g.add_argument("--log_with", choices=["tensorboard", "wandb", "all"],
                   help="trackers (default tensorboard when --logging_dir is set; wandb needs pip install wandb)")
    g.add_argument("--log_tracker_name", default="network_train", help="run name under the logging folder")
    g.add_argument("--log_tracker_config", help="TOML file with tracker init arguments ([tensorboard], [wandb])")
    g.add_argument("--log_config", action="store_true", help="log the training flags (paths and secrets removed)")
    g.add_argument("--wandb_run_name", help="W&B run name")
    g.add_argument("--wandb_api_key", help="W&B API key (better: put it in the environment as WANDB_API_KEY)")
    g.add_argument("--console_log_level", default="INFO")
    g.add_argument("--console_log_file", help="also write the log to this file (appended)")
    g.add_argument("--console_log_simple", action="store_true",
                   help="kohya's plain console log; this version's console log is always plain")


def add_config_file_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config file")
    g.add_argument("--config_file", help="training flags in TOML (command-line flags override it)")
    g.add_argument("--output_config", nargs="?", const=True,
                   help="write the flags given (file + command line) to this TOML and exit; without a path, to "
                        "the --config_file path (kohya's switch)")


def shared_training_parser(description: str, save_formats: tuple[str, ...] = ("safetensors", "ckpt", "pt"),
                           network: bool = True) -> argparse.ArgumentParser:
    """The flags every trainer shares; ``network`` adds the network ones (the LoRA trainers),
    ``save_formats`` are the --save_model_as choices."""
    p = argparse.ArgumentParser(description=description)
    for add in (add_model_args, add_dataset_args, add_caption_args):
        add(p)
    add_training_args(p, save_formats, network)
    for add in (add_noise_loss_args, add_optimizer_args, *([add_network_args] if network else []), add_sample_args,
                add_logging_args, add_config_file_args):
        add(p)
    return p


def network_training_parser(description: str) -> argparse.ArgumentParser:
    """The full parser of the LoRA trainers (family scripts add their own flags to it)."""
    return shared_training_parser(description)


def _add_speed_args(g) -> None:
    """Compiling, and which kernels run the denoiser's convolutions when training on the CPU
    (library/models/cpu_conv.py)."""
    add_compile_args(g)
    g.add_argument("--cpu_conv_kernels", choices=["auto", "onednn"], default="auto",
                   help="training on the CPU: auto (default) runs float32 convolutions on small feature maps (at "
                        "most 16x16) through PyTorch's own kernels, which are faster there; onednn runs every "
                        "convolution through oneDNN, as PyTorch does (see docs/performance.md)")


def add_compile_args(g) -> None:
    """kohya's --torch_compile / --dynamo_backend (training and gen_img.py)."""
    g.add_argument("--torch_compile", action="store_true",
                   help="compile the denoiser's repeated blocks with torch.compile (one block at a time, so "
                        "compiling stays short and a new bucket shape recompiles only the blocks it reaches); "
                        "see docs/performance.md for where it pays")
    g.add_argument("--dynamo_backend", default="inductor",
                   help="the torch.compile backend for --torch_compile: inductor (default), aot_eager, eager, "
                        "or another torch lists; 'no' (what the kohya_ss GUI writes) means no compiling")
