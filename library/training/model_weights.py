"""Full-weight training: the model's own weights as what is trained (train_db.py, fine_tune.py).

:class:`ModelTraining` is the "what is trained" object the trainer asks (see
:mod:`library.training.trained`); :class:`ModelWeights` is its trainable, which answers the loop
as :class:`networks.base.NetworkAdapter` does for a network: its modules (``net``), optimizer
groups, and its own file (the whole model, written through the family in the layout users load).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from library.config.model_training import ModelTrainConfig
from library.families.base import LoadedModels, ModelFamily
from library.training import kohya_state
from library.training.ema import WeightEMA
from library.training.sharding import TEXT_ENCODER_BLOCKS, Sharding
from library.training.trained import OwnTrainable, WhatIsTrained
from library.utils.errors import UserError

logger = logging.getLogger(__name__)


class ModelWeights(OwnTrainable):
    """The denoiser (and the text encoders, when they train) as one trainable."""

    def __init__(self, family: ModelFamily, models: LoadedModels, cfg: ModelTrainConfig):
        self.family, self.models, self.cfg = family, models, cfg
        trained = {"unet": models.denoiser}
        #: the text encoders that may train (SD3: the CLIPs, T5 with --train_t5xxl); those at rate 0
        #: are frozen by :meth:`optimizer_groups`
        self.text_encoders = family.trainable_text_encoders(models) if cfg.train_text_encoder else []
        trained |= {f"text_encoder{i}": te for i, te in enumerate(self.text_encoders)}
        # what the loop calls the network: state folders hold its state_dict, samples toggle its mode
        self.net = torch.nn.ModuleDict(trained)
        for module in [models.denoiser, models.vae, *models.text_encoders]:
            module.requires_grad_(False)
        self.net.requires_grad_(True)
        self.net.train()
        self.ema: WeightEMA | None = None  # made once the trained parameters are known
        self.sharding: Sharding | None = None  # --deepspeed: set by ModelTraining.shard

    def optimizer_groups(self, text_encoder_lr, unet_lr: float | None, default_lr: float):
        """One group for the denoiser, one per trained text encoder (kohya's ``lr/unet``,
        ``lr/textencoder``); a rate of 0 leaves that part frozen."""
        rates = text_encoder_lr if isinstance(text_encoder_lr, tuple) else (text_encoder_lr,)
        unet = default_lr if unet_lr is None else unet_lr
        groups, names = self._denoiser_groups(unet) if unet else ([], [])
        encoders = self.text_encoders
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
        frozen = self._freeze_last_blocks()
        if self.cfg.block_lr is None:
            return [{"params": [p for p in denoiser.parameters() if id(p) not in frozen], "lr": rate}], ["unet"]
        blocks: dict[int, list] = {}
        for name, param in denoiser.named_parameters():
            if id(param) in frozen:
                continue
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

    def _freeze_last_blocks(self) -> set[int]:
        """``--num_last_block_to_freeze N``: the ids of the last N blocks' parameters, now frozen."""
        count = self.cfg.frozen_last_blocks
        if not count:
            return set()
        blocks = self.family.freezable_blocks(self.models)
        if count >= len(blocks):
            logger.warning("--num_last_block_to_freeze %d: the model has %d blocks, so every block stays frozen "
                           "(only the embeddings and the final layer train)", count, len(blocks))
        frozen = [p for block in blocks[-count:] for p in block.parameters()]
        for param in frozen:
            param.requires_grad_(False)
        logger.info("--num_last_block_to_freeze: the last %d of %d blocks frozen (%.1fM weights)",
                    min(count, len(blocks)), len(blocks), sum(p.numel() for p in frozen) / 1e6)
        return {id(p) for p in frozen}

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def on_epoch_start(self, text_encoders, denoiser) -> None:
        self.net.train()

    def to(self, device, dtype: torch.dtype | None = None) -> ModelWeights:
        """Only a dtype change (``--full_bf16``): the family has placed the modules already, some
        of them deliberately elsewhere (SD3's swapped blocks in host memory, T5 on its device)."""
        if dtype is not None:
            self.net.to(dtype)
        return self

    def prepare_grad_etc(self, text_encoders, denoiser) -> None:
        """After the optimizer groups (which freeze parts at rate 0): the moving average of what trains."""
        ema = self.cfg.ema
        if ema is not None:
            trained = {name: p for name, p in self.net.named_parameters() if p.requires_grad}
            self.ema = WeightEMA(trained, ema.decay, ema.update_every, ema.on_cpu)

    def save(self, path: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        """The whole model in the family's single-file layout or as a diffusers folder: the trained
        weights, or with ``--ema`` their average (``--ema_save_mode both``: the weights, and the
        average as ``<name>-ema``). Sharded (``--deepspeed``): every process calls this, the whole
        tensors are gathered from all of them and rank 0 writes."""
        trained = self.trained_text_encoders()
        if self.ema is None or self.cfg.ema.save_mode == "both":
            with self._whole_weights() as writes:
                if writes:
                    self.family.save_model(self.models, path, dtype, metadata, self.cfg.as_folder, trained)
        if self.ema is not None:
            target = path if self.cfg.ema.save_mode == "ema" else ema_path(path)
            with self.ema.applied(), self._whole_weights() as writes:
                if writes:
                    self.family.save_model(self.models, str(target), dtype, {**(metadata or {}), "ss_ema": "True"},
                                           self.cfg.as_folder, trained)

    @contextmanager
    def _whole_weights(self):
        """Yields whether this process writes: always unsharded (the caller runs on rank 0 only)."""
        if self.sharding is None:
            yield True
        else:
            with self.sharding.whole_weights() as writes:
                yield writes

    def trained_text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """The text encoders in the optimizer (a rate of 0 left the others frozen)."""
        return tuple(te for te in self.text_encoders if any(p.requires_grad for p in te.parameters()))


def ema_path(path) -> Path:
    """Where ``--ema_save_mode both`` writes the average: ``<stem>-ema<suffix>`` (a folder: ``<name>-ema``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}-ema{path.suffix}") if path.suffix else path.with_name(f"{path.name}-ema")


class ModelTraining(WhatIsTrained):
    """The model's own weights trained (DreamBooth or fine-tuning)."""

    state_weights = "model.safetensors"
    weights_title = "model weights"
    saves_whole_model = True
    layout_scripts = {"sd1": "train_db.py or fine_tune.py", "sd2": "train_db.py or fine_tune.py",
                      "sdxl": "sdxl_train.py",
                      "sd3": "sd3_train.py"}
    nothing_to_train = ("nothing to train: the UNet and the text encoder all have a learning rate of 0; check "
                        "--learning_rate / --unet_lr / --learning_rate_te")

    def __init__(self, cfg: ModelTrainConfig):
        self.cfg = cfg

    def load_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """Trained weights are float32 (mixed precision computes in half, the optimizer updates the
        float32 masters); --full_fp16/--full_bf16 cast them afterwards."""
        return torch.float32

    def cast_frozen(self, family: ModelFamily, models: LoadedModels, weight_dtype: torch.dtype) -> None:
        """Before the family places the models (which may give a part its own dtype: SD3's
        ``--t5xxl_dtype``): the parts that never train (the VAE, frozen text encoders) in the
        mixed-precision dtype, as a network run holds them (``--no_half_vae`` keeps the VAE in
        float32)."""
        trained = family.trainable_text_encoders(models) if self.cfg.train_text_encoder else []
        for module in [models.vae, *(te for te in models.text_encoders if all(te is not t for t in trained))]:
            module.to(weight_dtype)

    def checkpointed_text_encoders(self, family: ModelFamily, models: LoadedModels) -> list[torch.nn.Module]:
        """``--gradient_checkpointing`` in the text encoders that train."""
        return family.trainable_text_encoders(models) if self.cfg.train_text_encoder else []

    def build(self, family: ModelFamily, models: LoadedModels) -> ModelWeights:
        problem = family.save_problem(models, self.cfg.save_as)
        if problem:  # found now, not at the first save after hours of training
            raise UserError(f"--save_model_as {self.cfg.save_as}: {problem}")
        return ModelWeights(family, models, self.cfg)

    def shard(self, trainable: ModelWeights, family: ModelFamily, models: LoadedModels, acc) -> Sharding | None:
        """``--deepspeed``: the denoiser sharded block by block, each trained text encoder whole
        (frozen parts stay whole on every process: nothing of theirs is trained or kept)."""
        if self.cfg.sharding is None:
            return None
        sharding = Sharding(self.cfg.sharding, acc.device, acc.num_processes)
        blocks = sharding.shard(models.denoiser, family.compiled_blocks)
        for te in trainable.text_encoders:
            sharding.shard(te, TEXT_ENCODER_BLOCKS)
        trainable.sharding = sharding
        if acc.is_main_process:
            logger.info("--deepspeed: the trained weights %s; the denoiser in %d blocks, %d text encoder(s)",
                        sharding.describe(), blocks, len(trainable.text_encoders))
        return sharding

    def live_text_encoders(self, family: ModelFamily, models: LoadedModels) -> list[int]:
        """SD3's --use_t5xxl_cache_only: the trainable encoders run at every step, the others' outputs
        are cached."""
        if not self.cfg.partial_text_cache:
            return []
        trained = family.trainable_text_encoders(models)
        return [i for i, te in enumerate(models.text_encoders) if any(te is t for t in trained)]

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
        ema = self.cfg.ema
        return {"trained": "model", "kind": self.cfg.kind, "train_text_encoder": self.cfg.train_text_encoder,
                "stop_text_encoder_training": self.cfg.stop_text_encoder_training,
                "block_lr": list(self.cfg.block_lr) if self.cfg.block_lr else None,
                "ema": [ema.decay, ema.update_every] if ema else None}

    def after_optimizer_step(self, trainable: ModelWeights, device, step: int) -> None:
        if trainable.ema is not None:
            trainable.ema.after_step(step)

    def sampling_weights(self, trainable: ModelWeights):
        """Sample images show the moving average when there is one (what ``--ema`` saves)."""
        return trainable.ema.applied() if trainable.ema is not None else nullcontext()

    def extra_state(self, trainable: ModelWeights) -> dict[str, torch.Tensor]:
        return trainable.ema.state_dict() if trainable.ema is not None else {}

    def load_extra_state(self, trainable: ModelWeights, state: dict[str, torch.Tensor] | None, folder) -> None:
        if trainable.ema is None:
            return
        try:
            trainable.ema.load_state_dict(state or {})
        except KeyError as exc:
            raise UserError(f"--resume {folder}: {exc.args[0]}; it was saved without --ema (or other parts "
                            "trained): resume without --ema, or from a state of an --ema run") from exc

    def companion_files(self, path) -> list:
        ema = self.cfg.ema
        return [ema_path(path)] if ema is not None and ema.save_mode == "both" else []

    def metadata(self, family_metadata: dict[str, str]) -> dict[str, str]:
        """The family's keys (a whole model: its modelspec architecture as it is) and the run's kind."""
        ema = self.cfg.ema
        return {**family_metadata, "ss_training_kind": self.cfg.kind,
                "ss_train_text_encoder": str(self.cfg.train_text_encoder),
                "ss_stop_text_encoder_training": str(self.cfg.stop_text_encoder_training),
                "ss_ema_decay": str(ema.decay if ema else None)}

    def restore_kohya(self, state: kohya_state.KohyaState, trainable: ModelWeights, optimizer) -> bool:
        raise UserError(f"--resume {state.folder}: a state folder kohya's scripts wrote; full-weight runs resume from "
                        "this toolkit's own state folders only (the model file it saved can start a new run)")
