"""The typed training configuration, built once from the parsed flags and checked before any model loads."""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.config.compile_options import compile_backend
from library.config.model_training import ModelTrainConfig, model_training_config
from library.data.dataset_config import (
    DatasetConfig,
    folders_to_config,
    load_config_file,
    metadata_to_config,
    parse_dataset_config,
)
from library.maths.precision import DTYPE_NAMES, check_precision_flags
from library.models.sd_loading import CHECKPOINT_SUFFIXES
from library.optim.optimizers import check_fused_backward, check_fused_optimizer_groups, check_optimizer_name
from library.sampling.prompts import SamplePrompt, load_prompt_file
from library.utils.errors import UserError
from library.utils.files import check_writable_folder, parse_user_file
from library.utils.ranges import TRAINING, check_flags
from networks.base import import_network_module, parse_network_args

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkConfig:
    module: str
    dim: int | None
    alpha: float | None
    args: dict[str, str]
    weights: str | None
    train_unet: bool
    train_text_encoder: bool
    dropout: float | None = None  # --network_dropout
    dim_from_weights: bool = False  # build the network from the ranks of `weights`
    base_weights: tuple[tuple[str, float], ...] = ()  # (LoRA file, strength) merged into the base first
    scale_weight_norms: float | None = None  # max-norm regularisation after each step


@dataclass(frozen=True)
class OptimizerConfig:
    optimizer_type: str
    optimizer_args: tuple[str, ...]
    learning_rate: float
    unet_lr: float | None
    text_encoder_lr: float | tuple[float | None, ...] | None  # a tuple: one rate per text encoder
    lr_scheduler: str
    lr_warmup: str
    num_cycles: int
    power: float
    max_grad_norm: float
    lr_decay: str = "0"
    min_lr_ratio: float | None = None
    scheduler_type: str | None = None
    scheduler_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class SaveConfig:
    output_dir: Path
    output_name: str
    extension: str
    precision: torch.dtype | None
    every_n_epochs: int | None
    every_n_steps: int | None
    no_metadata: bool
    training_comment: str | None
    save_state: bool = False
    save_state_on_train_end: bool = False
    modelspec: dict = field(default_factory=dict)
    last_n_epochs: int | None = None
    last_n_steps: int | None = None
    last_n_epochs_state: int | None = None
    last_n_steps_state: int | None = None
    lora_format: str = "kohya"  # "diffusers": the final file is also written in the diffusers/PEFT form
    n_epoch_ratio: int | None = None  # --save_n_epoch_ratio: every_n_epochs follows from the run's length


@dataclass(frozen=True)
class SampleConfig:
    prompts: tuple[SamplePrompt, ...]
    every_n_steps: int | None
    every_n_epochs: int | None
    at_first: bool
    sampler: str


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a run needs, resolved and validated."""

    model_path: str
    tokenizer_dir: str | None
    datasets: list[DatasetConfig]
    network: NetworkConfig | None  # None in the full-weight trainers (see `model`)
    optimizer: OptimizerConfig
    save: SaveConfig
    sample: SampleConfig
    seed: int
    max_train_steps: int
    max_train_epochs: int | None
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    mixed_precision: str
    cache_latents: bool
    vae_batch_size: int
    prior_loss_weight: float
    strict_dataset: bool
    num_workers: int
    persistent_workers: bool
    logging_dir: str | None
    log_prefix: str
    cache_to_disk: bool = False
    lowram: bool = False
    debug_dataset: bool = False
    cache_text: bool = False
    cache_text_to_disk: bool = False
    text_encoder_batch_size: int = 8
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    max_validation_steps: int | None = None
    full_half: str | None = None  # "fp16"/"bf16": the network itself in that dtype
    compile_backend: str | None = None  # --torch_compile: the denoiser's blocks compiled with this backend
    #: --cpu_conv_kernels auto: small-map float32 convolutions through PyTorch's kernels on the CPU
    route_small_cpu_convolutions: bool = True
    fp8_base: str | None = None  # "all" or "unet"
    attention: str = "sdpa"
    no_half_vae: bool = False
    fused_backward: bool = False
    fused_optimizer_groups: int | None = None  # --fused_optimizer_groups N (full-weight trainers)
    trackers: tuple[str, ...] = ()
    tracker_name: str = "network_train"
    tracker_init: dict = field(default_factory=dict)
    log_config: bool = False
    resume: str | None = None
    initial_step: int | None = None  # where counting starts without a state (resolved from --initial_epoch later)
    initial_epoch: int | None = None
    skip_until_initial_step: bool = False
    ddp_timeout: int | None = None  # minutes
    ddp_wrapper_flags: tuple[str, ...] = ()  # --ddp_static_graph etc. given (they tune a wrapper not used here)
    dataset_source: str = ""
    raw_args: dict = field(default_factory=dict)
    model: ModelTrainConfig | None = None  # the full-weight trainers' choices (train_db.py, fine_tune.py)


_PRECISIONS = {None: None, **DTYPE_NAMES}


def _resolution(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        parts = [int(x) for x in str(value).replace("x", ",").split(",")]  # "W,H" (kohya) or "WxH"
    except ValueError as exc:
        raise UserError(f"--resolution {value!r}: expected 'N' or 'W,H'") from exc
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise UserError(f"--resolution {value!r}: expected 'N' or 'W,H' with positive numbers")
    return (parts[0], parts[-1])


def build_datasets(args: argparse.Namespace) -> tuple[list[DatasetConfig], str]:
    """Dataset configs from --dataset_config or the legacy folder flags, with CLI values as fallbacks."""
    cli = {"resolution": _resolution(args.resolution), "batch_size": args.train_batch_size,
           "enable_bucket": args.enable_bucket, "min_bucket_reso": args.min_bucket_reso,
           "max_bucket_reso": args.max_bucket_reso, "bucket_reso_steps": args.bucket_reso_steps,
           "bucket_no_upscale": args.bucket_no_upscale, "caption_extension": args.caption_extension,
           "shuffle_caption": args.shuffle_caption, "keep_tokens": args.keep_tokens,
           "caption_dropout_rate": args.caption_dropout_rate, "flip_aug": args.flip_aug}
    for key in ("caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "caption_separator",
                "keep_tokens_separator", "secondary_separator", "caption_prefix", "caption_suffix",
                "enable_wildcard", "token_warmup_min", "token_warmup_step", "color_aug", "random_crop",
                "alpha_mask", "validation_split", "validation_seed", "resize_interpolation"):
        cli[key] = getattr(args, key)
    if args.dataset_config:
        ignored = [f for f in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, f)]
        if ignored:
            logger.warning("--dataset_config is given, so %s %s ignored", ", ".join(f"--{f}" for f in ignored),
                           "is" if len(ignored) == 1 else "are")
        return parse_dataset_config(load_config_file(args.dataset_config), args.dataset_config, cli), \
            args.dataset_config
    if args.in_json:
        raw = metadata_to_config(args.train_data_dir, args.in_json, args.dataset_repeats)
        return parse_dataset_config(raw, "--in_json", cli), args.in_json
    if args.train_data_dir:
        raw = folders_to_config(args.train_data_dir, args.reg_data_dir)
        return parse_dataset_config(raw, "--train_data_dir", cli), args.train_data_dir
    raise UserError("no training data: pass --dataset_config FILE or --train_data_dir FOLDER")


def _check_numbers(args: argparse.Namespace) -> None:
    check_flags(vars(args), TRAINING)  # every numeric flag in its range (library/utils/ranges.py)
    if args.resume and (args.initial_step is not None or args.initial_epoch is not None):
        raise UserError("--resume continues at the step its state folder records; --initial_step / --initial_epoch "
                        "are for starting from a network file (--network_weights) without a state: give one of them")
    if args.skip_until_initial_step and args.initial_step is None and args.initial_epoch is None:
        raise UserError("--skip_until_initial_step needs --initial_step or --initial_epoch (the step to start at)")
    if not hasattr(args, "network_module"):
        return  # a full-weight trainer: its own checks are in model_training.py
    if (args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk) \
            and not args.network_train_unet_only:
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only (a trained text encoder's "
                        "outputs change every step)")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")


def _check_cache_conflicts(args: argparse.Namespace, datasets: list[DatasetConfig]) -> None:
    if args.cache_latents or args.cache_latents_to_disk:
        check_latent_caching(datasets, "--cache_latents")


def check_latent_caching(datasets: list[DatasetConfig], what: str, to_disk: bool = False) -> None:
    """What caching latents cannot work with (the trainer's --cache_latents and tools/cache_latents.py
    both ask this): random crops and colours change the latent every epoch; with ``to_disk`` the
    image folders must be writable (the cache files go beside the images)."""
    for i, ds in enumerate(datasets):
        for j, sub in enumerate(ds.subsets):
            for key in ("color_aug", "random_crop", "face_crop_aug_range"):
                if getattr(sub, key):
                    raise UserError(f"{what} with {key} (datasets[{i}].subsets[{j}], {sub.image_dir}): a "
                                    f"cached latent fixes one crop and colour; remove {what} or {key}")
            if to_disk and sub.image_dir:
                check_writable_folder(sub.image_dir, f"datasets[{i}].subsets[{j}].image_dir (its cache files)")


def _check_masks(args: argparse.Namespace, datasets: list[DatasetConfig]) -> None:
    subsets = [(i, j, sub) for i, ds in enumerate(datasets) for j, sub in enumerate(ds.subsets)]
    with_dirs = [f"datasets[{i}].subsets[{j}]" for i, j, sub in subsets if sub.conditioning_data_dir]
    if with_dirs and not args.masked_loss:
        raise UserError(f"{', '.join(with_dirs)} set conditioning_data_dir: add --masked_loss to use those masks")
    if args.masked_loss and not with_dirs and not any(sub.alpha_mask for _, _, sub in subsets):
        raise UserError("--masked_loss needs mask images: set conditioning_data_dir (or alpha_mask) on a subset")
    for i, j, sub in subsets:
        if sub.conditioning_data_dir and not Path(sub.conditioning_data_dir).is_dir():
            raise UserError(f"datasets[{i}].subsets[{j}].conditioning_data_dir: folder not found: "
                            f"{sub.conditioning_data_dir}")


def _trackers(args: argparse.Namespace) -> tuple[str, ...]:
    """Which trackers to start; checks that their requirements are met."""
    chosen = args.log_with or ("tensorboard" if args.logging_dir else None)
    trackers = ("tensorboard", "wandb") if chosen == "all" else ((chosen,) if chosen else ())
    if "tensorboard" in trackers and not args.logging_dir:
        raise UserError("--log_with tensorboard needs --logging_dir")
    if "wandb" in trackers:
        try:
            import wandb  # noqa: F401  (an optional package: only --log_with wandb needs it)
        except ImportError as exc:
            raise UserError("--log_with wandb needs the wandb package: pip install wandb") from exc
    return trackers


def _tracker_init(args: argparse.Namespace) -> dict:
    init: dict = {}
    if args.log_tracker_config:
        p = Path(args.log_tracker_config)
        if not p.is_file():
            raise UserError(f"--log_tracker_config {p}: file not found")
        init = parse_user_file(p, "--log_tracker_config", "toml")
    if args.wandb_run_name:
        init.setdefault("wandb", {})["name"] = args.wandb_run_name
    return init


_PRIVATE = {"wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "dataset_config", "vae",
            "sample_prompts", "network_weights", "resume", "config_file", "output_config", "train_data_dir",
            "reg_data_dir", "tokenizer_cache_dir", "log_tracker_config", "output_dir", "logging_dir"}


def loggable_args(raw: dict) -> dict:
    """Flags safe to send to a tracker: scalars only, no paths and no secrets."""
    return {k: v for k, v in raw.items() if k not in _PRIVATE and not k.endswith(("_dir", "_path", "_file"))
            and isinstance(v, (int, float, str, bool))}


def _check_output_folders(args: argparse.Namespace, datasets: list[DatasetConfig]) -> None:
    """Every folder the run will write into, checked before any model loads (not at the first save,
    after the work): outputs, samples and states, logs, and the image folders that get cache files."""
    check_writable_folder(args.output_dir, "--output_dir")
    if args.logging_dir:
        check_writable_folder(args.logging_dir, "--logging_dir")
    if args.cache_latents_to_disk or args.cache_text_encoder_outputs_to_disk:
        for i, ds in enumerate(datasets):
            for j, sub in enumerate(ds.subsets):
                if sub.image_dir:
                    check_writable_folder(sub.image_dir, f"datasets[{i}].subsets[{j}].image_dir (its cache files)")


def _check_files(args: argparse.Namespace) -> None:
    model = Path(args.pretrained_model_name_or_path)
    if model.suffix in CHECKPOINT_SUFFIXES and not model.is_file():
        raise UserError(f"--pretrained_model_name_or_path {model}: file not found")
    if args.vae and not Path(args.vae).exists():
        raise UserError(f"--vae {args.vae}: file or folder not found")
    if getattr(args, "network_weights", None) and not Path(args.network_weights).is_file():
        raise UserError(f"--network_weights {args.network_weights}: file not found")


def _optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    custom = args.lr_scheduler_type
    if "." in args.lr_scheduler:  # kohya also takes a module.Class as --lr_scheduler
        if custom and custom != args.lr_scheduler:
            raise UserError(f"--lr_scheduler {args.lr_scheduler} and --lr_scheduler_type {custom}: give the "
                            "scheduler class once")
        custom = args.lr_scheduler
    return OptimizerConfig(args.optimizer_type, tuple(args.optimizer_args), args.learning_rate, args.unet_lr,
                           text_encoder_rates(args), args.lr_scheduler, args.lr_warmup_steps,
                           args.lr_scheduler_num_cycles, args.lr_scheduler_power, args.max_grad_norm,
                           args.lr_decay_steps, args.lr_scheduler_min_lr_ratio, custom, tuple(args.lr_scheduler_args))


def text_encoder_rates(args: argparse.Namespace) -> float | tuple[float | None, ...] | None:
    """``--text_encoder_lr`` (one value for every encoder, or one per encoder: CLIP-L, CLIP-G, T5),
    with SDXL's ``--text_encoder_lr1/2`` overriding the rate of one encoder."""
    rates = list(args.text_encoder_lr or [])
    if len(rates) > 3:
        raise UserError(f"--text_encoder_lr: at most one value per text encoder (3 for SD3), got {len(rates)}")
    per_encoder = [getattr(args, f"text_encoder_lr{i}", None) for i in (1, 2, 3)]
    while per_encoder and per_encoder[-1] is None:
        per_encoder.pop()
    if len(rates) < 2 and not per_encoder:
        return rates[0] if rates else None
    count = max(2, len(rates), len(per_encoder))
    base = rates + [rates[0] if rates else None] * (count - len(rates))
    per_encoder += [None] * (count - len(per_encoder))
    return tuple(own if own is not None else b for own, b in zip(per_encoder, base))


def _network_args(args: argparse.Namespace) -> dict[str, str]:
    """``--network_args``, with kohya's ``--loraplus_*_lr_ratio`` flags as the same-named network
    args (the flags win, as kohya applies them after the network is built)."""
    values = parse_network_args(args.network_args)
    for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if getattr(args, name, None) is not None:
            values[name] = str(getattr(args, name))
    return values


def _network_config(args: argparse.Namespace) -> NetworkConfig:
    """The network flags, checked (files, counts, ranges) before any model loads."""
    if args.dim_from_weights and not args.network_weights:
        raise UserError("--dim_from_weights reads the ranks from --network_weights: give that file too")
    multipliers = list(args.base_weights_multiplier or [])
    if len(multipliers) > len(args.base_weights):
        raise UserError(f"--base_weights_multiplier: {len(multipliers)} values for {len(args.base_weights)} "
                        "--base_weights file(s); give one per file")
    for path in args.base_weights:
        if not Path(path).is_file():
            raise UserError(f"--base_weights {path}: file not found")
    base = tuple((path, multipliers[i] if i < len(multipliers) else 1.0) for i, path in enumerate(args.base_weights))
    return NetworkConfig(args.network_module, args.network_dim, args.network_alpha, _network_args(args),
                         args.network_weights, train_unet=not args.network_train_text_encoder_only,
                         train_text_encoder=not args.network_train_unet_only, dropout=args.network_dropout,
                         dim_from_weights=args.dim_from_weights, base_weights=base,
                         scale_weight_norms=args.scale_weight_norms)


def _save_config(args: argparse.Namespace) -> SaveConfig:
    folder = args.save_model_as.startswith("diffusers")  # a whole model as a diffusers folder: no suffix
    return SaveConfig(
        Path(args.output_dir), args.output_name, "" if folder else "." + args.save_model_as,
        _PRECISIONS[args.save_precision],
        args.save_every_n_epochs, args.save_every_n_steps, args.no_metadata, args.training_comment,
        save_state=args.save_state, save_state_on_train_end=args.save_state_on_train_end,
        last_n_epochs=args.save_last_n_epochs, last_n_steps=args.save_last_n_steps,
        last_n_epochs_state=args.save_last_n_epochs_state or args.save_last_n_epochs,
        last_n_steps_state=args.save_last_n_steps_state or args.save_last_n_steps,
        lora_format=getattr(args, "save_lora_format", "kohya"), n_epoch_ratio=args.save_n_epoch_ratio,
        modelspec={k[len("metadata_"):]: v for k, v in vars(args).items()
                   if k.startswith("metadata_") and v is not None})


def build_training_config(args: argparse.Namespace, model_kind: str | None = None) -> TrainingConfig:
    """Validate flags, dataset config and prompt file; nothing heavy is loaded here. ``model_kind``
    ("dreambooth", "fine_tune", "sdxl", "sd3"): a full-weight trainer's flags (no network flags
    then); "textual_inversion": the token trainers' (their own config is built beside this one)."""

    _check_numbers(args)
    check_precision_flags(args.mixed_precision, args.full_fp16, args.full_bf16, args.fp8_base or args.fp8_base_unet)
    _check_files(args)
    datasets, source = build_datasets(args)
    _check_output_folders(args, datasets)
    _check_cache_conflicts(args, datasets)
    _check_masks(args, datasets)
    if model_kind is None:
        import_network_module(args.network_module)
    check_optimizer_name(args.optimizer_type)
    if args.fused_backward_pass:
        check_fused_backward(args.optimizer_type, args.gradient_accumulation_steps)
    fused_groups = getattr(args, "fused_optimizer_groups", None)  # the full-weight trainers' flag
    if fused_groups is not None:
        check_fused_optimizer_groups(fused_groups, args.optimizer_type, args.gradient_accumulation_steps,
                                     args.fused_backward_pass)
    prompts = tuple(load_prompt_file(args.sample_prompts)) if args.sample_prompts else ()
    return TrainingConfig(
        model_path=args.pretrained_model_name_or_path, tokenizer_dir=args.tokenizer_cache_dir, datasets=datasets,
        network=_network_config(args) if model_kind is None else None,
        model=model_training_config(args, datasets, model_kind) if model_kind not in (None, "textual_inversion")
        else None,
        optimizer=_optimizer_config(args), save=_save_config(args),
        sample=SampleConfig(prompts, args.sample_every_n_steps, args.sample_every_n_epochs, args.sample_at_first,
                            args.sample_sampler),
        seed=args.seed if args.seed is not None else random.randint(0, 2**31 - 1),
        max_train_steps=args.max_train_steps, max_train_epochs=args.max_train_epochs,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
        cache_latents=args.cache_latents or args.cache_latents_to_disk, cache_to_disk=args.cache_latents_to_disk,
        debug_dataset=args.debug_dataset, lowram=args.lowram, validate_every_n_steps=args.validate_every_n_steps,
        # SD3's --use_t5xxl_cache_only turns caching on, as in kohya
        cache_text=(args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
                    or getattr(args, "use_t5xxl_cache_only", False)),
        cache_text_to_disk=args.cache_text_encoder_outputs_to_disk,
        text_encoder_batch_size=args.text_encoder_batch_size,
        validate_every_n_epochs=args.validate_every_n_epochs, max_validation_steps=args.max_validation_steps,
        vae_batch_size=args.vae_batch_size,
        prior_loss_weight=args.prior_loss_weight, strict_dataset=args.strict_dataset,
        num_workers=args.max_data_loader_n_workers, persistent_workers=args.persistent_data_loader_workers,
        full_half="fp16" if args.full_fp16 else ("bf16" if args.full_bf16 else None),
        compile_backend=compile_backend(args),
        route_small_cpu_convolutions=args.cpu_conv_kernels == "auto",
        fp8_base="unet" if args.fp8_base_unet else ("all" if args.fp8_base else None),
        attention="xformers" if args.xformers else ("mem_eff" if args.mem_eff_attn else "sdpa"),
        no_half_vae=args.no_half_vae, fused_backward=args.fused_backward_pass, fused_optimizer_groups=fused_groups,
        logging_dir=args.logging_dir, log_prefix=args.log_prefix, trackers=_trackers(args),
        tracker_name=args.log_tracker_name, tracker_init=_tracker_init(args), log_config=args.log_config,
        resume=args.resume, initial_step=args.initial_step, initial_epoch=args.initial_epoch,
        skip_until_initial_step=args.skip_until_initial_step, ddp_timeout=args.ddp_timeout, dataset_source=source,
        ddp_wrapper_flags=tuple(f"--{f}" for f in ("ddp_gradient_as_bucket_view", "ddp_static_graph")
                                if getattr(args, f)),
        raw_args=vars(args).copy())
