"""The valid range of every numeric flag and prompt-line option, in one table per kind, checked
where the values are read (the training flags, gen_img's flags, sample-prompt lines), so a zero
batch size or a negative step count is named with its range instead of failing deep inside."""

from __future__ import annotations

from dataclasses import dataclass

from library.utils.errors import UserError


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (None: no bound; ``above`` makes the low bound strict, ``below`` the high)."""

    low: float | None = None
    high: float | None = None
    above: bool = False
    below: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.below else value > self.high))

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'above' if self.above else 'at least'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'below' if self.below else 'at most'} {self.high:g}")
        return " and ".join(parts)


COUNT = Range(1)  # a number of things or steps
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, above=True)
PROBABILITY = Range(0, 1)
SEED = Range(0, 2**32 - 1)

#: training flags (train_network.py and the family scripts); flags not here have no numeric range
TRAINING = {
    "max_train_steps": COUNT, "max_train_epochs": COUNT, "train_batch_size": COUNT, "gradient_accumulation_steps":
    COUNT, "vae_batch_size": COUNT, "text_encoder_batch_size": COUNT, "network_dim": COUNT, "save_every_n_epochs":
    COUNT, "save_every_n_steps": COUNT, "save_last_n_epochs": COUNT, "save_last_n_steps": COUNT,
    "save_last_n_epochs_state": COUNT, "save_last_n_steps_state": COUNT, "sample_every_n_steps": COUNT,
    "fused_optimizer_groups": COUNT,
    "sample_every_n_epochs": COUNT, "validate_every_n_steps": COUNT, "validate_every_n_epochs": COUNT,
    "max_validation_steps": COUNT, "save_n_epoch_ratio": COUNT, "initial_epoch": COUNT, "ddp_timeout": COUNT,
    "lr_scheduler_num_cycles": COUNT, "clip_skip": COUNT, "min_bucket_reso": COUNT, "max_bucket_reso": COUNT,
    "bucket_reso_steps": COUNT, "multires_noise_iterations": COUNT, "initial_step": NON_NEGATIVE,
    "max_data_loader_n_workers": NON_NEGATIVE, "keep_tokens": NON_NEGATIVE, "caption_dropout_every_n_epochs":
    NON_NEGATIVE, "token_warmup_min": NON_NEGATIVE, "token_warmup_step": NON_NEGATIVE, "dataset_repeats": COUNT,
    "learning_rate": NON_NEGATIVE, "unet_lr": NON_NEGATIVE, "text_encoder_lr": NON_NEGATIVE,
    "text_encoder_lr1": NON_NEGATIVE, "text_encoder_lr2": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
    "network_alpha": NON_NEGATIVE, "prior_loss_weight": NON_NEGATIVE, "noise_offset": NON_NEGATIVE,
    "ip_noise_gamma": NON_NEGATIVE, "min_snr_gamma": POSITIVE,
    "huber_c": POSITIVE, "huber_scale": POSITIVE, "v_pred_like_loss": NON_NEGATIVE, "lr_scheduler_power": POSITIVE,
    "lr_scheduler_min_lr_ratio": PROBABILITY, "caption_dropout_rate": PROBABILITY,
    "caption_tag_dropout_rate": PROBABILITY, "multires_noise_discount": PROBABILITY,
    "min_timestep": Range(0, 1000), "max_timestep": Range(0, 1000), "seed": SEED, "validation_seed": SEED,
    "network_dropout": Range(0, 1, below=True), "validation_split": Range(0, 1, below=True),
    "scale_weight_norms": POSITIVE, "stop_text_encoder_training": Range(-1),
    "ema_decay": Range(0, 1, below=True), "ema_update_every": COUNT,
}

#: gen_img.py's flags (``vae_batch_size`` below 1 is a share of the batch, as in kohya)
GENERATION = {
    "steps": Range(1, 1000), "batch_size": COUNT, "images_per_prompt": COUNT, "n_iter": COUNT, "seed": SEED,
    "scale": NON_NEGATIVE, "strength": PROBABILITY, "vae_batch_size": POSITIVE, "clip_skip": COUNT,
    "max_embeddings_multiples": COUNT, "highres_fix_steps": COUNT, "highres_fix_strength": PROBABILITY,
    "network_merge_n_models": COUNT, "ddim_eta": NON_NEGATIVE, "t5xxl_max_token_length": COUNT,
    "flow_shift": POSITIVE,
}

#: sample-prompt line options (``--s 28 --w 512 ...``), the same in training's sample files and gen_img
PROMPT_OPTIONS = {"s": Range(1, 1000), "w": Range(64, 16384), "h": Range(64, 16384), "l": NON_NEGATIVE, "d": SEED}


def check(value, rng: Range, where: str) -> None:
    """Refuse a value outside its range, naming where it came from and the range."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if v is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and not rng.holds(v):
            raise UserError(f"{where} {v}: must be {rng.describe()}")


def check_flags(values: dict, table: dict[str, Range]) -> None:
    """Every flag of ``table`` present in ``values`` (an argparse namespace's dict) within its range."""
    for name, rng in table.items():
        if name in values:
            check(values[name], rng, f"--{name}")
