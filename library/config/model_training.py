"""The full-weight trainers' own choices (train_db.py, fine_tune.py), checked before any model loads."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from library.config.sharding import ShardingOptions, sharding_options
from library.data.dataset_config import DatasetConfig
from library.utils.errors import UserError

logger = logging.getLogger(__name__)

#: kohya's --save_model_as values for whole models; the diffusers ones are folders
SAVE_FORMATS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors")
#: kohya's --block_lr: one rate per SDXL UNet block (embeddings, 9 input, 3 middle, 9 output, out)
SDXL_BLOCK_LR_COUNT = 23


@dataclass(frozen=True)
class EMAOptions:
    """``--ema``: a moving average of the trained weights (library/training/ema.py)."""

    decay: float
    update_every: int  # optimizer steps between updates
    on_cpu: bool  # the averages in CPU memory instead of next to the weights
    save_mode: str  # "ema": saved models are the averages; "both": the weights, and the averages as <name>-ema


@dataclass(frozen=True)
class ModelTrainConfig:
    """What a full-weight run trains and how it is written."""

    #: "dreambooth" (train_db.py: image folders, class tokens, regularisation), "fine_tune" (fine_tune.py:
    #: metadata JSON), "sdxl" or "sd3" (sdxl_train.py, sd3_train.py: either kind of dataset, as kohya's)
    kind: str
    train_text_encoder: bool  # whether the text encoder is in the optimizer at all
    stop_text_encoder_training: int | None  # it trains for steps 1..N only (None: every step)
    save_as: str  # one of SAVE_FORMATS
    block_lr: tuple[float, ...] | None = None  # SDXL: a rate per UNet block (kohya's --block_lr)
    ema: EMAOptions | None = None
    frozen_last_blocks: int = 0  # SD3: the denoiser's last N blocks stay frozen (--num_last_block_to_freeze)
    #: SD3's --use_t5xxl_cache_only: the frozen encoders' outputs are cached, the trained ones run each step
    partial_text_cache: bool = False
    sharding: ShardingOptions | None = None  # --deepspeed: the trained weights sharded over processes

    @property
    def as_folder(self) -> bool:
        return self.save_as.startswith("diffusers")

    def trains_text_encoder_at(self, step: int) -> bool:
        """Whether the text encoder trains in ``step`` (counted from 1)."""
        stop = self.stop_text_encoder_training
        return self.train_text_encoder and (stop is None or step <= stop)


def _check_datasets(kind: str, datasets: list[DatasetConfig], from_json: bool) -> None:
    """train_db.py takes folders, fine_tune.py metadata, as in kohya; each points to the other."""
    subsets = [(i, j, sub) for i, ds in enumerate(datasets) for j, sub in enumerate(ds.subsets)]
    if kind == "dreambooth":
        metadata = [f"datasets[{i}].subsets[{j}]" for i, j, sub in subsets if sub.metadata_file]
        if from_json or metadata:
            where = "--in_json" if from_json else ", ".join(metadata)
            raise UserError(f"{where}: fine-tuning metadata; train_db.py trains DreamBooth folders (class tokens, "
                            "caption files, regularisation images). Use fine_tune.py for metadata datasets")
    elif kind == "fine_tune":
        folders = [f"datasets[{i}].subsets[{j}] ({sub.image_dir})" for i, j, sub in subsets if not sub.metadata_file]
        if folders:
            raise UserError(f"{', '.join(folders)}: no metadata_file; fine_tune.py trains from captions in a metadata "
                            "JSON (--in_json, or metadata_file in the dataset config). Use train_db.py for DreamBooth "
                            "folders")
    refuse_network_keys(datasets, "a full-weight run")


def refuse_network_keys(datasets: list[DatasetConfig], run: str) -> None:
    """Dataset keys that only mean something to a network: its strength per dataset, and
    diff_output_preservation (the base model's own output, got by turning the network off)."""
    for i, ds in enumerate(datasets):
        if float(ds.network_multiplier) != 1.0:
            raise UserError(f"datasets[{i}].network_multiplier {ds.network_multiplier}: a network's strength; {run} "
                            "has no network (remove the key)")
    preserved = [f"datasets[{i}].subsets[{j}]" for i, ds in enumerate(datasets) for j, sub in enumerate(ds.subsets)
                 if sub.custom_attributes.get("diff_output_preservation")]
    if preserved:
        raise UserError(f"{', '.join(preserved)}: diff_output_preservation compares with the base model's own "
                        f"output with the network turned off; {run} has no network to turn off")


def model_training_config(args: argparse.Namespace, datasets: list[DatasetConfig], kind: str) -> ModelTrainConfig:
    """The choices of train_db.py (``kind="dreambooth"``), fine_tune.py (``"fine_tune"``),
    sdxl_train.py (``"sdxl"``) or sd3_train.py (``"sd3"``)."""
    _check_datasets(kind, datasets, bool(args.in_json) and not args.dataset_config)
    sharding = sharding_options(args)
    if kind == "dreambooth":
        stop = args.stop_text_encoder_training
        train_te = stop is None or stop > 0  # kohya: -1 (and 0) never train it
        stop = stop if train_te else None
    else:
        train_te, stop = bool(args.train_text_encoder), None
    if getattr(args, "no_token_padding", False) and (args.cache_text_encoder_outputs
                                                     or args.cache_text_encoder_outputs_to_disk):
        raise UserError("--no_token_padding makes a caption's encoding depend on the batch it is in, so it cannot be "
                        "cached: remove --cache_text_encoder_outputs or --no_token_padding")
    if args.fp8_base or args.fp8_base_unet:
        raise UserError("--fp8_base / --fp8_base_unet store frozen weights in fp8; a full-weight run trains the "
                        "model's own weights, which cannot be fp8 (remove the flag)")
    partial = bool(getattr(args, "use_t5xxl_cache_only", False))
    if (args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk) and train_te and not partial:
        flag = "--stop_text_encoder_training -1" if kind == "dreambooth" else "no --train_text_encoder"
        # the scripts whose family can cache one encoder alone have the flag for it (sd3_train.py)
        also = "; --use_t5xxl_cache_only caches the frozen T5 while the CLIPs train" \
            if hasattr(args, "use_t5xxl_cache_only") else ""
        raise UserError("--cache_text_encoder_outputs: the text encoder is trained in this run, so its outputs change; "
                        f"cache only with a frozen text encoder ({flag}){also}")
    if partial:
        logger.info("--use_t5xxl_cache_only: T5-XXL's outputs are cached%s", "; CLIP-L/G run at every step"
                    if train_te else " (with the CLIPs frozen, as --cache_text_encoder_outputs caches all three)")
    return ModelTrainConfig(kind, train_te, stop, args.save_model_as, _block_lr(getattr(args, "block_lr", None)),
                            _ema(args), _frozen_last_blocks(getattr(args, "num_last_block_to_freeze", None)),
                            partial_text_cache=partial and train_te, sharding=sharding)


def _frozen_last_blocks(count: int | None) -> int:
    """kohya's --num_last_block_to_freeze. kohya freezes the last N *parameters* whose name holds
    "x_block" (a fraction of one block for small N); here it is N whole blocks, as the name says."""
    if count is None:
        return 0
    if count < 1:
        raise UserError(f"--num_last_block_to_freeze {count}: give a number of blocks of at least 1 (or leave it out)")
    return count


def _ema(args: argparse.Namespace) -> EMAOptions | None:
    tuned = [f"--{k}" for k in ("ema_decay", "ema_update_every", "ema_save_mode") if getattr(args, k) is not None]
    tuned += ["--ema_cpu"] if args.ema_cpu else []
    if not args.ema:
        if tuned:
            raise UserError(f"{', '.join(tuned)}: set how the moving average works; add --ema to keep one")
        return None
    return EMAOptions(0.9999 if args.ema_decay is None else args.ema_decay, args.ema_update_every or 1,
                      args.ema_cpu, args.ema_save_mode or "ema")


def _block_lr(text: str | None) -> tuple[float, ...] | None:
    """kohya's ``--block_lr "lr0,lr1,...,lr22"``: 23 non-negative rates (0 freezes a block)."""
    if text is None:
        return None
    try:
        rates = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise UserError(f"--block_lr {text!r}: comma-separated numbers expected") from exc
    if len(rates) != SDXL_BLOCK_LR_COUNT or min(rates) < 0:
        raise UserError(f"--block_lr: {len(rates)} values given; give {SDXL_BLOCK_LR_COUNT} rates of at least 0 "
                        "(time/label embeddings, input blocks 0-8, middle block 0-2, output blocks 0-8, out)")
    return rates
