"""Full-weight training: the model's own weights as what is trained (train_db.py, fine_tune.py).

:class:`ModelTraining` is the "what is trained" object the trainer asks (see
:mod:`library.training.trained`); :class:`ModelWeights` is its trainable, which answers the loop
as :class:`networks.base.NetworkAdapter` does for a network: its modules (``net``), optimizer
groups, and its own file (the whole model, written through the family in the layout users load).
"""

from __future__ import annotations

import logging

import torch

from library.config.model_training import ModelTrainConfig
from library.families.base import LoadedModels, ModelFamily
from library.training import kohya_state
from library.utils.errors import UserError

logger = logging.getLogger(__name__)


class ModelWeights:
    """The denoiser (and the text encoders, when they train) as one trainable."""

    def __init__(self, family: ModelFamily, models: LoadedModels, cfg: ModelTrainConfig):
        self.family, self.models, self.cfg = family, models, cfg
        trained = {"unet": models.denoiser}
        if cfg.train_text_encoder:
            trained |= {f"text_encoder{i}": te for i, te in enumerate(models.text_encoders)}
        # what the loop calls the network: state folders hold its state_dict, samples toggle its mode
        self.net = torch.nn.ModuleDict(trained)
        for module in [models.denoiser, models.vae, *models.text_encoders]:
            module.requires_grad_(False)
        self.net.requires_grad_(True)
        self.net.train()

    def optimizer_groups(self, text_encoder_lr, unet_lr: float | None, default_lr: float):
        """One group for the denoiser, one per trained text encoder (kohya's ``lr/unet``,
        ``lr/textencoder``); a rate of 0 leaves that part frozen."""
        rates = text_encoder_lr if isinstance(text_encoder_lr, tuple) else (text_encoder_lr,)
        unet = default_lr if unet_lr is None else unet_lr
        groups, names = self._denoiser_groups(unet) if unet else ([], [])
        if self.cfg.train_text_encoder:
            encoders = self.models.text_encoders
            for i, te in enumerate(encoders):
                rate = rates[min(i, len(rates) - 1)]
                rate = default_lr if rate is None else rate
                if rate:
                    groups.append({"params": list(te.parameters()), "lr": rate})
                    names.append("textencoder" if len(encoders) == 1 else f"textencoder{i + 1}")
                else:
                    te.requires_grad_(False)
        if not unet:
            self.models.denoiser.requires_grad_(False)
        return groups, names

    def _denoiser_groups(self, rate: float) -> tuple[list[dict], list[str]]:
        """The denoiser in one group, or (SDXL's ``--block_lr``) one group per block at its rate,
        the blocks at 0 frozen."""
        denoiser = self.models.denoiser
        if self.cfg.block_lr is None:
            return [{"params": list(denoiser.parameters()), "lr": rate}], ["unet"]
        blocks: dict[int, list] = {}
        for name, param in denoiser.named_parameters():
            blocks.setdefault(self.family.block_lr_index(self.models, name), []).append(param)
        groups, names = [], []
        for index in sorted(blocks):
            block_rate = self.cfg.block_lr[index]
            if block_rate:
                groups.append({"params": blocks[index], "lr": block_rate})
                names.append(f"unet_block{index:02d}")
            else:
                for param in blocks[index]:
                    param.requires_grad_(False)
        return groups, names

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def on_epoch_start(self, text_encoders, denoiser) -> None:
        self.net.train()

    def on_step_start(self, text_encoders, denoiser) -> None:
        """Nothing: which parts train in a step is the trainer's question to ModelTraining."""

    def set_multiplier(self, multiplier: float) -> None:
        """A network's strength; datasets asking for one are refused before training."""

    def enable_gradient_checkpointing(self) -> None:
        """Nothing more: the trainer turns it on in the denoiser and the trained text encoders."""

    def prepare_grad_etc(self, text_encoders, denoiser) -> None:
        """Nothing: requires_grad was set when this was built."""

    def save(self, path: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        """The whole model as it is now, in the family's single-file layout or a diffusers folder."""
        self.family.save_model(self.models, path, dtype, metadata, self.cfg.as_folder)


class ModelTraining:
    """The model's own weights trained (DreamBooth or fine-tuning)."""

    state_weights = "model.safetensors"
    weights_title = "model weights"
    layout_scripts = {"sd1": "train_db.py or fine_tune.py", "sd2": "train_db.py or fine_tune.py",
                      "sdxl": "sdxl_train.py",
                      "sd3": "sd3_train_network.py for a LoRA (SD3 full-weight training is not in this version yet)"}
    nothing_to_train = ("nothing to train: the UNet and the text encoder all have a learning rate of 0; check "
                        "--learning_rate / --unet_lr / --learning_rate_te")

    def __init__(self, cfg: ModelTrainConfig):
        self.cfg = cfg

    def check(self, family: ModelFamily) -> None:
        """Nothing beyond what the config builder checked."""

    def load_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """Trained weights are float32 (mixed precision computes in half, the optimizer updates the
        float32 masters); --full_fp16/--full_bf16 cast them afterwards."""
        return torch.float32

    def prepare(self, models: LoadedModels, device, weight_dtype: torch.dtype) -> None:
        """The parts that do not train (the VAE, a frozen text encoder) in the mixed-precision
        dtype, as a network run holds them (``--no_half_vae`` keeps the VAE in float32)."""
        frozen = [models.vae] + ([] if self.cfg.train_text_encoder else list(models.text_encoders))
        for module in frozen:
            module.to(weight_dtype)

    def build(self, family: ModelFamily, models: LoadedModels) -> ModelWeights:
        problem = family.save_problem(models, self.cfg.as_folder)
        if problem:  # found now, not at the first save after hours of training
            raise UserError(f"--save_model_as {self.cfg.save_as}: {problem}")
        return ModelWeights(family, models, self.cfg)

    @property
    def trains_text_encoders(self) -> bool:
        return self.cfg.train_text_encoder

    def trains_text_encoders_at(self, step: int) -> bool:
        return self.cfg.trains_text_encoder_at(step)

    def check_schedule(self, max_steps: int) -> None:
        stop = self.cfg.stop_text_encoder_training
        if stop is not None and stop >= max_steps:
            logger.warning("--stop_text_encoder_training %d is at or past the end of the run (%d steps): the text "
                           "encoder trains for the whole run", stop, max_steps)

    def fingerprint(self) -> dict:
        return {"trained": "model", "kind": self.cfg.kind, "train_text_encoder": self.cfg.train_text_encoder,
                "stop_text_encoder_training": self.cfg.stop_text_encoder_training}

    def after_optimizer_step(self, trainable: ModelWeights, device) -> None:
        return None

    def metadata(self) -> dict[str, str]:
        return {"ss_training_kind": self.cfg.kind, "ss_train_text_encoder": str(self.cfg.train_text_encoder),
                "ss_stop_text_encoder_training": str(self.cfg.stop_text_encoder_training)}

    def restore_kohya(self, state: kohya_state.KohyaState, trainable: ModelWeights, optimizer) -> bool:
        raise UserError(f"--resume {state.folder}: a state folder kohya's scripts wrote; full-weight runs resume from "
                        "this toolkit's own state folders only (the model file it saved can start a new run)")
