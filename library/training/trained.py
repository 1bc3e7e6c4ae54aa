"""What a run trains. The loop in ``trainer.py`` works with one of these and never asks which:

* :class:`NetworkTraining`: a network plug-in (LoRA, LyCORIS, ...) hooked into the frozen model;
  its trainable is the plug-in wrapped in :class:`networks.base.NetworkAdapter`.
* :class:`library.training.model_weights.ModelTraining`: the model's own weights (DreamBooth,
  fine-tuning); its trainable, ``ModelWeights``, answers the loop as the adapter does.
* :class:`library.training.token_vectors.TokenTraining`: new token vectors (textual inversion).

:class:`WhatIsTrained` holds the answers most of them share (nothing to do); :class:`OwnTrainable`
the same for the trainables this project writes itself (the adapter wraps any plug-in).

A "what is trained" object is made before any model loads (its checks run first), builds the
trainable once the models are loaded, and tells the loop the few things that differ: which dtype
the trained weights are loaded in, whether the text encoders train at a given step, the metadata
keys describing it, and what a state folder holds.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import torch

from library.config.training_config import NetworkConfig, TrainingConfig
from library.families.base import LoadedModels, ModelFamily
from library.models.sd_loading import NETWORK_SCRIPTS
from library.training import kohya_state
from library.training.network_setup import build_network, check_network_setup, merge_base_weights
from networks.base import NetworkAdapter


class WhatIsTrained:
    """The defaults of a "what is trained" object: each hook below does nothing."""

    #: saved files hold the whole model (VAE and text encoders too), so none of it may be freed
    saves_whole_model = False

    def check(self, family: ModelFamily) -> None:
        """Before any model loads: nothing beyond what the config builder checked."""

    def prepare_captions(self, group) -> None:
        """Before any model loads: nothing; captions are trained as the subsets process them."""

    def cast_frozen(self, family: ModelFamily, models: LoadedModels, weight_dtype: torch.dtype) -> None:
        """Before the family places the models: nothing (they were loaded in the dtype they train in)."""

    def prepare(self, models: LoadedModels, device, weight_dtype: torch.dtype) -> None:
        """After placing, before caching: nothing."""

    def check_schedule(self, max_steps: int) -> None:
        """Nothing depends on the run's length."""

    def shard(self, trainable, family: ModelFamily, models: LoadedModels, acc):
        """Before the optimizer is made: split what is trained over processes (``--deepspeed``);
        None, it is not (every process holds all of it, gradients are averaged after backward)."""
        return None

    def live_text_encoders(self, family: ModelFamily, models: LoadedModels) -> list[int]:
        """With cached text outputs, the encoders (indices) that still run at every step: none,
        every output is cached."""
        return []

    def after_optimizer_step(self, trainable, device, step: int):
        """Nothing after each optimizer step (None: nothing to log)."""
        return None

    def sampling_weights(self, trainable):
        """The weights sample images are made with: the trained ones as they are."""
        return nullcontext()

    def extra_state(self, trainable) -> dict[str, torch.Tensor]:
        """What a state folder holds beyond the weights, optimizer, scheduler and RNG: nothing."""
        return {}

    def load_extra_state(self, trainable, state: dict[str, torch.Tensor] | None, folder) -> None:
        """Nothing to restore."""

    def companion_files(self, path) -> list:
        """Files written next to each saved file (pruned with it): none."""
        return []


class OwnTrainable:
    """The loop's per-epoch and per-step hooks for the trainables written here: nothing to do."""

    def on_epoch_start(self, text_encoders, denoiser) -> None:
        """Nothing."""

    def on_step_start(self, text_encoders, denoiser) -> None:
        """Nothing: which parts train in a step is the loop's question to what is trained."""

    def set_multiplier(self, multiplier: float) -> None:
        """A network's strength; datasets asking for one are refused before training."""

    def enable_gradient_checkpointing(self) -> None:
        """Nothing more: the trainer turns it on in the denoiser and the encoders that train."""

    def prepare_grad_etc(self, text_encoders, denoiser) -> None:
        """Nothing."""


class NetworkTraining(WhatIsTrained):
    """A network plug-in trained on the frozen model (train_network.py and its family twins)."""

    #: the file holding the trained weights in a state folder
    state_weights = "network.safetensors"
    weights_title = "network weights"
    layout_scripts = NETWORK_SCRIPTS
    nothing_to_train = ("nothing to train: every part of the network has a learning rate of 0 or no parameters; "
                        "check --learning_rate / --unet_lr / --text_encoder_lr (a rate of 0 leaves its part out) "
                        "and --network_train_unet_only / --network_train_text_encoder_only")

    def __init__(self, cfg: NetworkConfig, diffusers_export: bool = False):
        self.cfg, self.diffusers_export = cfg, diffusers_export

    @classmethod
    def from_config(cls, config: TrainingConfig) -> NetworkTraining:
        return cls(config.network, config.save.lora_format == "diffusers")

    def check(self, family: ModelFamily) -> None:
        """Before any model loads: the plug-in's args and the LoRA files to start from or merge."""
        check_network_setup(self.cfg, family)

    def load_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The base model is frozen: it is loaded in the mixed-precision dtype."""
        return weight_dtype

    def checkpointed_text_encoders(self, family: ModelFamily, models: LoadedModels) -> list[torch.nn.Module]:
        """``--gradient_checkpointing`` in every text encoder when the network trains them."""
        return list(models.text_encoders) if self.cfg.train_text_encoder else []

    def prepare(self, models: LoadedModels, device, weight_dtype: torch.dtype) -> None:
        """After loading, before caching: ``--base_weights`` merged (they change text outputs)."""
        merge_base_weights(self.cfg, models, device)

    def build(self, family: ModelFamily, models: LoadedModels) -> NetworkAdapter:
        return build_network(self.cfg, models, self.diffusers_export)

    @property
    def trains_text_encoders(self) -> bool:
        """Whether a text encoder trains at any step (no text caching then)."""
        return self.cfg.train_text_encoder

    def trains_text_encoders_at(self, step: int) -> bool:
        return self.cfg.train_text_encoder

    def fingerprint(self) -> dict:
        """What a state folder must have been made with to be resumed by this run."""
        n = self.cfg
        return {"module": n.module, "dim": n.dim, "alpha": n.alpha, "args": n.args, "train_unet": n.train_unet,
                "train_text_encoder": n.train_text_encoder}

    def after_optimizer_step(self, trainable: NetworkAdapter, device, step: int) -> tuple[int, float, float] | None:
        """``--scale_weight_norms``: (keys scaled, mean norm, max norm) after each optimizer step."""
        if self.cfg.scale_weight_norms:
            return trainable.max_norm_regularize(self.cfg.scale_weight_norms, device)
        return None

    def metadata(self, family_metadata: dict[str, str]) -> dict[str, str]:
        """The family's keys with kohya's ``ss_network_*`` ones; the modelspec architecture is the
        base model's with ``/lora`` (SAI's model spec for adapters)."""
        n = self.cfg
        arch = family_metadata["modelspec.architecture"]
        return {**family_metadata, "modelspec.architecture": f"{arch}/lora", "ss_network_module": n.module,
                "ss_network_dim": str(n.dim if n.dim is not None else 4),
                "ss_network_alpha": str(n.alpha if n.alpha is not None else 1.0),
                "ss_network_args": json.dumps(n.args), "ss_network_dropout": str(n.dropout),
                "ss_scale_weight_norms": str(n.scale_weight_norms)}

    def restore_kohya(self, state: kohya_state.KohyaState, trainable: NetworkAdapter, optimizer) -> bool:
        """A state folder kohya wrote: its network weights (they must fit), its optimizer state
        where the layout matches (returns whether it was used)."""
        kohya_state.load_network(state, trainable.net)
        return kohya_state.load_optimizer(state, optimizer)
