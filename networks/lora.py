"""kohya-style LoRA for SD1.x/2.x UNets and CLIP text encoders (``--network_module networks.lora``).

Each target Linear/Conv2d keeps its weights W; its forward becomes
``W x + up(down(x)) * multiplier * alpha / dim`` with ``up`` initialised to zero, so training starts
from the base model exactly. Saved keys follow kohya's format, which AUTOMATIC1111, Forge, ComfyUI
and diffusers' ``load_lora_weights`` read:
``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (SD1/2 in
diffusers' layout, SDXL in SGM's: see :mod:`networks.lora_names`) and
``lora_te[1|2]_text_model_encoder_layers_<i>_<self_attn|mlp>_<proj>.*``.

network_args: ``conv_dim``/``conv_alpha`` (LoRA on 3x3 convs of resnets and samplers as well);
``loraplus_lr_ratio`` / ``loraplus_unet_lr_ratio`` / ``loraplus_text_encoder_lr_ratio`` (LoRA+, Hayou et
al. 2024: the ``lora_up`` matrices learn at ``ratio`` times the learning rate); ``down_lr_weight`` /
``mid_lr_weight`` / ``up_lr_weight`` / ``block_lr_zero_threshold`` (block-wise UNet learning rates,
see :mod:`networks.block_lr`); ``block_dims`` / ``block_alphas`` / ``conv_block_dims`` /
``conv_block_alphas`` (rank and alpha per UNet block, 25 values for SD1/SD2, 23 for SDXL);
``dropout`` (= ``--network_dropout``), ``rank_dropout``, ``module_dropout`` (training-only
regularisers, see :class:`networks.lora_modules.Dropouts`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from library.utils.errors import UserError
from library.utils.files import save_torch
from library.utils.safetensors_io import save_safetensors
from networks.block_lr import BlockRanks, block_index, block_lr_weights, block_ranks
from networks.lora_merge import read_lora
from networks.lora_modules import Dropouts, FusedLoRAModule, LoRAModule
from networks.lora_names import find_targets, te_lora_name, to_kohya_names, uses_sgm_names

logger = logging.getLogger(__name__)

#: create_network_from_weights reads every rank and option from the file (no --network_args at generation)
SHAPE_FROM_FILE = True

__all__ = ["FusedLoRAModule", "LoRAModule", "LoRANetwork", "create_network", "create_network_from_weights",
           "te_lora_name"]


class LoRANetwork(nn.Module):
    """All LoRA modules of one model, with the trainer-facing methods of the plug-in contract."""

    #: prepare_optimizer_params takes a list of text-encoder rates, one per encoder
    per_encoder_lr = True

    def __init__(self, text_encoders: list[nn.Module], unet: nn.Module, multiplier: float, dim: int,
                 alpha: float | None, conv_dim: int = 0, conv_alpha: float | None = None,
                 module_dims: dict[str, int] | None = None, module_alphas: dict[str, float] | None = None,
                 block_lr: list[float] | None = None, targets: list | None = None,
                 ranks: BlockRanks | None = None, dropouts: Dropouts | None = None):
        """``module_dims``/``module_alphas`` (from a file) override the ranks per module and limit
        the network to the modules they name; ``block_lr`` (see :mod:`networks.block_lr`) scales
        the UNet learning rate per block, and blocks weighted 0 get no LoRA; ``ranks`` sets UNet
        ranks per block. ``targets`` (from another family's target finder, e.g.
        :mod:`networks.lora_sd3`) replace SD's. ``dropouts`` act while training only."""
        super().__init__()
        self.multiplier = multiplier
        self.loraplus: dict[str, float | None] = {}
        self.sgm = uses_sgm_names(unet)
        self.block_lr = block_lr
        if targets is None:
            with_conv = bool(conv_dim) or module_dims is not None or (ranks is not None and ranks.conv_dims is not None)
            targets = find_targets(text_encoders, unet, with_conv)
        self.targets = targets
        # modules are registered under their kohya names, so state_dict() keys are the file's keys
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        # which text encoder each text-encoder module belongs to, for one learning rate per encoder
        # (kohya looked this up by the lora_te1_/lora_te2_ prefixes, which SD1's lora_te_ never has)
        self.encoder_of: dict[str, int] = {t.name: t.encoder for t in self.targets if t.part == "te"}
        for t in self.targets:
            if module_dims is not None and t.name not in module_dims:
                continue
            if t.part == "unet" and self._block_weight(t.name) == 0:
                continue
            d, a = (conv_dim, conv_alpha) if t.is_conv3 else (t.dim if t.dim is not None else dim, alpha)
            if ranks is not None and t.part == "unet":
                d, a = ranks.rank(t.name, t.is_conv3, d, a)
            d, a = _rank(t.name, d, a, module_dims, module_alphas)
            if not d:  # a rank of 0 means no LoRA on that module
                continue
            module = self._make_module(t, multiplier, d, a)
            module.dropouts = dropouts
            (self.text_encoder_loras if t.part == "te" else self.unet_loras).append(module)
        for lora in self.all_loras():
            if hasattr(self, lora.lora_name):
                raise ValueError(f"duplicate LoRA module name {lora.lora_name}")
            self.add_module(lora.lora_name, lora)

    def _make_module(self, target, multiplier: float, dim: int, alpha: float | None) -> nn.Module:
        """One module's LoRA (subclasses build other kinds of update on the same targets)."""
        if target.fused:
            return FusedLoRAModule(target.name, list(target.fused), multiplier, dim, alpha)
        return LoRAModule(target.name, target.module, multiplier, dim, alpha, swap_out_halves=target.swap_out_halves)

    def _block_weight(self, lora_name: str) -> float:
        if self.block_lr is None:
            return 1.0
        index = block_index(lora_name, self.sgm)
        return self.block_lr[index] if 0 <= index < len(self.block_lr) else 1.0

    def all_loras(self) -> list[LoRAModule]:
        return list(self.text_encoder_loras) + list(self.unet_loras)

    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the selected parts; the parts not trained are dropped from the network."""
        dropped = (self.text_encoder_loras if not apply_text_encoder else []) + \
            (self.unet_loras if not apply_unet else [])
        for lora in dropped:
            delattr(self, lora.lora_name)
        if not apply_text_encoder:
            self.text_encoder_loras = []
        if not apply_unet:
            self.unet_loras = []
        for lora in self.all_loras():
            lora.apply_to()

    @torch.no_grad()
    def merge_to(self, text_encoder=None, unet=None, weights_sd: dict | None = None, dtype=None, device=None) -> None:
        """kohya's merge (``--network_merge``): ``weights_sd`` loaded when given, then ``multiplier *
        scale * up @ down`` added into the base weights, hooked or not; the model then runs at full
        speed without hooks and the network is spent. The models are the ones it was built on."""
        if weights_sd is not None:
            self.load_state_dict(weights_sd, strict=False)
        for lora in self.all_loras():
            _add_update(lora, self.multiplier)
            lora.remove()

    @torch.no_grad()
    def pre_calculation(self) -> None:
        """kohya's ``--network_pre_calc``: add the update at the current strength into the base
        weights (keeping copies of them) and pause the hooks, for merged speed with strengths that
        may change; :meth:`restore_weights` undoes it."""
        self.restore_weights()
        for lora in self.all_loras():
            for org in _base_modules(lora):
                self._weight_copies.setdefault(id(org), (org, org.weight.detach().clone()))
            _add_update(lora, self.multiplier)
            lora.enabled = False

    @torch.no_grad()
    def restore_weights(self) -> None:
        """The base weights as they were before :meth:`pre_calculation`, hooks active again."""
        for org, weight in getattr(self, "_weight_copies", {}).values():
            org.weight.copy_(weight)
        self._weight_copies: dict = {}
        for lora in self.all_loras():
            lora.enabled = True

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.all_loras():
            lora.multiplier = multiplier

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float, device) -> tuple[int, float, float]:
        """kohya's ``--scale_weight_norms``: every module whose update ``scale * up @ down`` has a
        Frobenius norm above ``max_norm`` gets ``up`` and ``down`` each multiplied by
        sqrt(max_norm / norm), which brings the norm to ``max_norm``. Returns (modules scaled, mean
        and largest update norm after scaling)."""
        scaled, norms = 0, []
        for lora in self.all_loras():
            norm = float(lora.delta_weight().float().norm())
            if norm > max_norm:
                factor = (max_norm / norm) ** 0.5
                lora.lora_up.weight.mul_(factor)
                lora.lora_down.weight.mul_(factor)
                scaled, norm = scaled + 1, max_norm
            norms.append(norm)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    def load_weights(self, file: str) -> str:
        """Load a kohya-format file (non-strict: keys of parts not trained are ignored)."""
        state = to_kohya_names(_read_lora_file(file), self.targets)
        ours = set(self.state_dict())
        if not ours & set(state):
            raise UserError(f"--network_weights {file}: none of its keys match this network "
                            "(is it a LoRA for another model family?)")
        try:
            info = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a rank or shape that differs
            raise UserError(f"--network_weights {file}: its tensors do not fit this network "
                            f"({str(exc).splitlines()[-1].strip()}); build the network from the file's ranks "
                            "(same --network_dim / network_args) or start without it") from exc
        unused = sorted(set(state) - ours)
        if unused:
            logger.warning("%s: %d of its tensors are not used (parts not trained, or modules this network does "
                           "not have), e.g. %s", file, len(unused), unused[:2])
        return f"loaded {len(ours & set(state))} tensors ({len(info.missing_keys)} of ours not in the file)"

    def set_loraplus_ratios(self, unet_ratio: float | None, text_encoder_ratio: float | None) -> None:
        """LoRA+: ``lora_up`` weights get their part's learning rate times this ratio."""
        self.loraplus = {"unet": unet_ratio, "textencoder": text_encoder_ratio}

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        """One group per part (two with LoRA+: ``<part>`` and ``<part> plus``); returns (groups, names).
        ``text_encoder_lr`` may be a list with one rate per text encoder (SDXL's te1 and te2)."""
        groups, names = [], []
        for loras, lr, name in self._parts(text_encoder_lr, unet_lr, default_lr):
            ratio = self.loraplus.get("unet" if name.startswith("unet") else "textencoder")
            if ratio:
                base = [p for m in loras for n, p in self._trained(m) if not n.startswith("lora_up")]
                plus = [p for m in loras for n, p in self._trained(m) if n.startswith("lora_up")]
                parts = [(base, lr, name), (plus, lr * ratio, f"{name} plus")]
            else:
                parts = [([p for m in loras for _, p in self._trained(m)], lr, name)]
            for params, group_lr, group_name in parts:
                if params:
                    groups.append({"params": params, "lr": group_lr})
                    names.append(group_name)
        return groups, names

    def _parts(self, text_encoder_lr, unet_lr, default_lr) -> list[tuple[list[LoRAModule], float, str]]:
        """(modules, learning rate, log name) per trained part (per UNet block with block weights)."""
        unet_rate = unet_lr if unet_lr is not None else default_lr
        unet = [(self.unet_loras, unet_rate, "unet")]
        if self.block_lr is not None:
            blocks: dict[int, list[LoRAModule]] = {}
            for m in self.unet_loras:
                blocks.setdefault(block_index(m.lora_name, self.sgm), []).append(m)
            unet = [(mods, unet_rate * self._block_weight(mods[0].lora_name), f"unet block{i:02d}")
                    for i, mods in sorted(blocks.items())]
        return self._text_encoder_parts(text_encoder_lr, default_lr) + unet

    def _text_encoder_parts(self, text_encoder_lr, default_lr) -> list[tuple[list[LoRAModule], float, str]]:
        """One part per text encoder when rates are given per encoder (kohya: an encoder without a rate
        of its own trains at the default rate), else one part for all of them."""
        rates = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        rates = [r if r is not None else default_lr for r in rates]
        by_encoder: dict[int, list[LoRAModule]] = {}
        for m in self.text_encoder_loras:
            by_encoder.setdefault(self.encoder_of.get(m.lora_name, 0), []).append(m)
        if len(rates) == 1 or len(by_encoder) <= 1:
            used = min(by_encoder, default=0)
            rate = rates[used] if used < len(rates) else default_lr
            if len(rates) > 1 and len(set(rates)) > 1:
                logger.warning("--text_encoder_lr %s: this network trains one text encoder, which uses %s",
                               rates, rate)
            return [(self.text_encoder_loras, rate, "textencoder")]
        return [(mods, rates[i] if i < len(rates) else default_lr, f"textencoder{i + 1}")
                for i, mods in sorted(by_encoder.items())]

    def enable_gradient_checkpointing(self) -> None:
        """LoRA needs nothing here: checkpointing of the base model covers the hooked forwards."""

    def _trained(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The parameters of one module that training updates (all of them here)."""
        return list(module.named_parameters())

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(False)
        for m in self.all_loras():
            for _, p in self._trained(m):
                p.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def get_trainable_params(self):
        return [p for m in self.all_loras() for _, p in self._trained(m)]

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict | None) -> None:
        """Write the LoRA (safetensors with metadata and kohya's hashes, or a torch pickle)."""
        state = {k: (v.detach().to("cpu", dtype) if dtype is not None else v.detach().cpu())
                 for k, v in self.state_dict().items()}
        if os.path.splitext(file)[1] == ".safetensors":
            save_safetensors(state, file, metadata, model_hashes=True)
        else:
            save_torch(state, file)


def _rank(name, dim, alpha, module_dims, module_alphas):
    if module_dims is None:
        return dim, alpha
    return module_dims[name], (module_alphas or {}).get(name, module_dims[name])


def _read_lora_file(file: str) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors; a missing, damaged or unsafe file is a UserError naming it."""
    return read_lora(file, "LoRA file")[0]


def _as_list(text_encoder) -> list[nn.Module]:
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


def _base_modules(lora) -> list:
    return list(lora._orgs) if isinstance(lora, FusedLoRAModule) else [lora._org[0]]


def _add_update(lora, multiplier: float) -> None:
    """Add ``multiplier`` times the LoRA's update into its base module(s) weights."""
    delta = lora.delta_weight().float() * multiplier
    parts = delta.split(lora.splits) if isinstance(lora, FusedLoRAModule) else [delta]
    for org, part in zip(_base_modules(lora), parts):
        # the sum in float32, rounded once to the weight's dtype (a half-precision model is not
        # rounded twice), with one layer's float copy at a time
        weight = org.weight
        weight.copy_(weight.float() + part.to(weight.device).reshape(weight.shape))


#: network_args every kohya LoRA module takes (training options; none changes the file's layout)
TRAINING_ARGS = {"dropout", "rank_dropout", "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                 "loraplus_text_encoder_lr_ratio"}
KNOWN_ARGS = TRAINING_ARGS | {"conv_dim", "conv_alpha", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
                              "block_lr_zero_threshold", "block_dims", "block_alphas", "conv_block_dims",
                              "conv_block_alphas"}


def _probability(key: str, value) -> float | None:
    if value is None or value == "" or str(value) == "None":
        return None
    try:
        p = float(value)
    except ValueError as exc:
        raise UserError(f"{key} {value!r}: expected a probability between 0 and 1") from exc
    if not 0 <= p < 1:
        raise UserError(f"{key} {value}: a dropout probability must be at least 0 and below 1")
    return p or None


def parse_dropouts(kwargs: dict, neuron_dropout: float | None) -> Dropouts | None:
    """``--network_dropout`` (or the network arg ``dropout``, which kohya fills from it) and the
    ``rank_dropout`` / ``module_dropout`` network args; None when all are off."""
    neuron = _probability("--network_dropout", neuron_dropout) if neuron_dropout is not None else \
        _probability("--network_args dropout", kwargs.get("dropout"))
    dropouts = Dropouts(neuron, _probability("--network_args rank_dropout", kwargs.get("rank_dropout")),
                        _probability("--network_args module_dropout", kwargs.get("module_dropout")))
    return dropouts if dropouts.active else None


def _loraplus_ratios(kwargs: dict) -> tuple[float | None, float | None]:
    """LoRA+ ratios (UNet, text encoders) from the network args; the shared one fills either."""
    try:
        plus = {k: float(kwargs[k]) for k in kwargs if k.startswith("loraplus")}
    except ValueError as exc:
        raise UserError(f"--network_args: loraplus_* ratios must be numbers ({exc})") from exc
    shared = plus.get("loraplus_lr_ratio")
    return plus.get("loraplus_unet_lr_ratio", shared), plus.get("loraplus_text_encoder_lr_ratio", shared)


def check_training_options(kwargs: dict, neuron_dropout: float | None) -> None:
    """The dropouts and LoRA+ ratios checked, without a network."""
    parse_dropouts(kwargs, neuron_dropout)
    _loraplus_ratios(kwargs)


def set_training_options(network: LoRANetwork, kwargs: dict, neuron_dropout: float | None) -> LoRANetwork:
    """Dropouts and LoRA+ ratios from the network args (for a network built from args or from a file)."""
    dropouts = parse_dropouts(kwargs, neuron_dropout)
    for lora in network.all_loras():
        lora.dropouts = dropouts
    network.set_loraplus_ratios(*_loraplus_ratios(kwargs))
    return network


@dataclass(frozen=True)
class _Shape:
    """What the network args say about the network's layout, parsed and checked."""

    conv_dim: int
    conv_alpha: float | None
    block_lr: list[float] | None
    ranks: BlockRanks | None


def _parse_shape(kwargs: dict, sgm: bool, alpha: float) -> _Shape:
    unknown = sorted(set(kwargs) - KNOWN_ARGS)
    if unknown:
        raise UserError(f"--network_args: unknown key(s) {unknown} for networks.lora (known: {sorted(KNOWN_ARGS)})")
    try:
        conv_dim = int(kwargs.get("conv_dim", 0) or 0)
        conv_alpha = float(kwargs["conv_alpha"]) if kwargs.get("conv_alpha") else (1.0 if conv_dim else None)
    except ValueError as exc:
        raise UserError(f"--network_args: conv_dim must be an int, conv_alpha a number ({exc})") from exc
    return _Shape(conv_dim, conv_alpha, block_lr_weights(kwargs, sgm), block_ranks(kwargs, sgm, alpha, conv_alpha))


def check_network_args(kwargs: dict, family: str, neuron_dropout: float | None = None) -> None:
    """The network args checked without a model (the trainer calls this before loading one):
    unknown keys, numbers, per-block list lengths for ``family`` ("sd" or "sdxl"), dropouts."""
    _parse_shape(kwargs, family == "sdxl", 1.0)
    check_training_options(kwargs, neuron_dropout)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    """The plug-in entry point. ``network_dim`` defaults to 4 and ``network_alpha`` to 1, as in kohya."""
    return build_from_args(LoRANetwork, multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout,
                           kwargs)


def build_from_args(cls: type[LoRANetwork], multiplier: float, network_dim: int | None, network_alpha: float | None,
                    text_encoder, unet, neuron_dropout: float | None, kwargs: dict) -> LoRANetwork:
    """A network of class ``cls`` (LoRANetwork or a subclass) from kohya's create_network arguments."""
    alpha = network_alpha if network_alpha is not None else 1.0
    shape = _parse_shape(kwargs, uses_sgm_names(unet), alpha)
    network = cls(_as_list(text_encoder), unet, multiplier, network_dim or 4, alpha, shape.conv_dim,
                  shape.conv_alpha, block_lr=shape.block_lr, ranks=shape.ranks)
    return set_training_options(network, kwargs, neuron_dropout)


def ranks_from_state(state: dict[str, torch.Tensor], file) -> tuple[dict[str, int], dict[str, float]]:
    """Each module's rank (from ``lora_down``) and alpha in a kohya-format state dict."""
    dims, alphas = {}, {}
    for key, value in state.items():
        name = key.split(".")[0]
        if key.endswith("lora_down.weight"):
            dims[name] = value.shape[0]
        elif key.endswith(".alpha"):
            alphas[name] = float(value)
    if not dims:
        raise UserError(f"{file}: no LoRA keys (lora_down.weight) found")
    return dims, alphas


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs):
    """Build a network whose ranks and alphas are read from a LoRA file (or state dict); for
    training (``--dim_from_weights``) the training options in ``kwargs`` apply as well."""
    return build_from_file(LoRANetwork, multiplier, file, text_encoder, unet, weights_sd, for_inference, kwargs)


def build_from_file(cls: type[LoRANetwork], multiplier: float, file: str | None, text_encoder, unet,
                    weights_sd: dict | None, for_inference: bool, kwargs: dict) -> tuple[LoRANetwork, dict]:
    """A network of class ``cls`` shaped like a kohya-format file (see create_network_from_weights)."""
    state = weights_sd if weights_sd is not None else _read_lora_file(file)
    state = to_kohya_names(state, find_targets(_as_list(text_encoder), unet, with_conv=True))
    dims, alphas = ranks_from_state(state, file)
    network = cls(_as_list(text_encoder), unet, multiplier, max(dims.values()), None,
                  module_dims=dims, module_alphas=alphas)
    unknown = sorted(set(dims) - {m.lora_name for m in network.all_loras()})
    if unknown:
        raise UserError(f"{file}: {len(unknown)} of its {len(dims)} LoRA modules do not exist in this model, e.g. "
                        f"{unknown[:2]} (is it a LoRA for another model family?)")
    if not for_inference:
        set_training_options(network, {k: v for k, v in kwargs.items() if k in TRAINING_ARGS},
                             kwargs.get("neuron_dropout"))
    return network, state
