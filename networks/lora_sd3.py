"""kohya-style LoRA for SD3/SD3.5 MMDiTs (``--network_module networks.lora_sd3``).

Modules are named as kohya names them, after the original single-file MMDiT layout that SD3.5
files and ComfyUI use: ``lora_unet_joint_blocks_<i>_{x_block,context_block}_{attn_qkv, attn_proj,
mlp_fc1, mlp_fc2, adaLN_modulation_1}`` (``x_block_attn2_*`` on SD3.5 Medium), with q/k/v as one
fused LoRA (shared ``lora_down``, stacked ``lora_up``) as the original ``qkv`` matrix is one
tensor. Text encoders: ``lora_te1_`` (CLIP-L), ``lora_te2_`` (CLIP-G), ``lora_te3_`` (T5-XXL, only
with ``train_t5xxl=True``).

network_args (kohya's): ``context_attn_dim``, ``context_mlp_dim``, ``context_mod_dim``,
``x_attn_dim``, ``x_mlp_dim``, ``x_mod_dim`` (rank per kind of layer; 0 = no LoRA there; default
``--network_dim``); ``emb_dims=[a,b,c,d,e,f]`` (context_embedder, t_embedder, x_embedder, y_embedder,
final_layer adaLN modulation, final_layer linear; default: the final layer at ``--network_dim``,
no embedders, as the project's spec asks (kohya's default leaves the final layer out: pass
``emb_dims=[0,0,0,0,0,0]`` for that)); ``train_block_indices``
(``all``, ``none``, ``0,1,4-5,7``); ``train_t5xxl=True``; ``verbose=True``; ``conv_dim`` /
``conv_alpha`` are accepted as kohya's are (the GUI's LoCon sends them) with a warning, as there
are no convolutions to put them on; plus networks.lora's
LoRA+ ratios and dropouts (``dropout`` / ``--network_dropout``, ``rank_dropout``, ``module_dropout``).
"""

from __future__ import annotations

import logging
import re

from torch import nn

from library.models import sd3_keys
from library.utils.errors import UserError
from networks.lora import (
    TRAINING_ARGS,
    LoRANetwork,
    _as_list,
    _read_lora_file,
    check_training_options,
    ranks_from_state,
    set_training_options,
)
from networks.lora_names import Target, find_targets, to_kohya_names

logger = logging.getLogger(__name__)

#: create_network_from_weights reads every rank and option from the file (no --network_args at generation)
SHAPE_FROM_FILE = True

LAYER_KINDS = ("context_attn_dim", "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim")
EMB_NAMES = ("context_embedder", "t_embedder", "x_embedder", "y_embedder", "final_layer_adaLN_modulation",
             "final_layer_linear")
# each embedding group: (diffusers module, original module) pairs
_EMB_MODULES = {
    "context_embedder": [("context_embedder", "context_embedder")],
    "t_embedder": [("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
                   ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")],
    "x_embedder": [("pos_embed.proj", "x_embedder.proj")],
    "y_embedder": [("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
                   ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")],
    "final_layer_adaLN_modulation": [("norm_out.linear", "final_layer.adaLN_modulation.1")],
    "final_layer_linear": [("proj_out", "final_layer.linear")],
}
T5_TARGET = re.compile(r"(^|\.)encoder\.block\.\d+\.layer\.\d+\."
                       r"(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wi|wo))$")
KNOWN_ARGS = {*LAYER_KINDS, "emb_dims", "train_block_indices", "train_t5xxl", "verbose", "conv_dim", "conv_alpha",
              *TRAINING_ARGS}


def _kind(original: str) -> str:
    """``x_block.attn.qkv`` -> ``x_attn_dim``: which rank setting a block layer follows."""
    half, part = original.split(".")[0].split("_")[0], original.split(".")[1]
    what = "mod" if part.startswith("adaLN") else ("attn" if part.startswith("attn") else "mlp")
    return f"{half}_{what}_dim"


def parse_block_indices(text: str | None, num_blocks: int) -> set[int]:
    """``all`` / ``none`` / ``0,1,4-5,7`` -> block indices; out-of-range indices are refused."""
    if text is None or text.strip().lower() == "all":
        return set(range(num_blocks))
    if text.strip().lower() == "none":
        return set()
    out: set[int] = set()
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not m:
            raise UserError(f"--network_args train_block_indices={text}: '{item}' is not an index or a range a-b")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if first > last or last >= num_blocks:
            raise UserError(f"--network_args train_block_indices={text}: {item.strip()} is outside this model's "
                            f"blocks 0-{num_blocks - 1}")
        out.update(range(first, last + 1))
    return out


def parse_emb_dims(text: str | None, default_dim: int = 0) -> list[int]:
    """``[a,b,c,d,e,f]`` -> six ranks. Without the arg: the final layer (its adaLN modulation and
    linear) at ``default_dim`` and no embedders."""
    if text is None:
        return [0, 0, 0, 0, default_dim, default_dim]
    values = [v for v in re.split(r"[\s,\[\]]+", text) if v]
    try:
        dims = [int(v) for v in values]
    except ValueError as exc:
        raise UserError(f"--network_args emb_dims={text}: expected 6 integers like [4,0,0,4,0,0]") from exc
    if len(dims) != 6:
        raise UserError(f"--network_args emb_dims={text}: expected 6 numbers ({', '.join(EMB_NAMES)}), "
                        f"got {len(dims)}")
    return dims


def mmdit_targets(transformer: nn.Module, dims: dict[str, int | None], emb_dims: list[int],
                  blocks: set[int]) -> list[Target]:
    """Every MMDiT module LoRA can attach to, named in kohya's SD3 format, with its rank."""
    modules = dict(transformer.named_modules())
    last = transformer.config.num_layers - 1
    targets = []
    for i in range(transformer.config.num_layers):
        prefix = f"transformer_blocks.{i}."
        for original, parts in sd3_keys._FUSED.items():
            present = [p for p in parts if prefix + p in modules]
            if present:
                targets.append(Target(_name(f"joint_blocks.{i}.{original}"), None, "unet",
                                      fused=tuple(modules[prefix + p] for p in present),
                                      dim=dims[_kind(original)] if i in blocks else 0,
                                      peft=tuple(f"transformer.{prefix}{p}" for p in present)))
        for inner, original in sd3_keys._BLOCK.items():
            module = modules.get(prefix + inner)
            if isinstance(module, nn.Linear):
                targets.append(Target(_name(f"joint_blocks.{i}.{original}"), module, "unet",
                                      dim=dims[_kind(original)] if i in blocks else 0,
                                      swap_out_halves=sd3_keys._swapped(prefix + inner, last),
                                      aliases=[f"transformer.{prefix}{inner}"], peft=(f"transformer.{prefix}{inner}",)))
    for group, dim in zip(EMB_NAMES, emb_dims):
        for path, original in _EMB_MODULES[group]:
            targets.append(Target(_name(original), modules[path], "unet", dim=dim,
                                  swap_out_halves=sd3_keys._swapped(path, last), aliases=[f"transformer.{path}"],
                                  peft=(f"transformer.{path}",)))
    return targets


def _name(original: str) -> str:
    return "lora_unet_" + original.replace(".", "_")


def t5_targets(t5: nn.Module, prefix: str = "lora_te3") -> list[Target]:
    return [Target(f"{prefix}_{path.replace('.', '_')}", m, "te", peft=(f"text_encoder_3.{path}",), encoder=2)
            for path, m in t5.named_modules() if isinstance(m, nn.Linear) and T5_TARGET.search(path)]


def _targets(text_encoders: list[nn.Module], transformer: nn.Module, dims, emb_dims, blocks,
             train_t5: bool) -> list[Target]:
    clips = text_encoders[:2]
    targets = find_targets(clips, None, with_conv=False)
    if train_t5 and len(text_encoders) > 2:
        targets += t5_targets(text_encoders[2])
    return targets + mmdit_targets(transformer, dims, emb_dims, blocks)


def _layer_dims(kwargs: dict, dim: int) -> dict[str, int]:
    unknown = sorted(set(kwargs) - KNOWN_ARGS)
    if unknown:
        raise UserError(f"--network_args: unknown key(s) {unknown} for networks.lora_sd3 (known: {sorted(KNOWN_ARGS)})")
    try:
        return {k: int(kwargs[k]) if k in kwargs else dim for k in LAYER_KINDS}
    except ValueError as exc:
        raise UserError(f"--network_args: {', '.join(LAYER_KINDS)} must be integers ({exc})") from exc


def check_network_args(kwargs: dict, family: str, neuron_dropout: float | None = None) -> None:
    """The network args checked without a model (before the trainer loads one): keys, numbers,
    ``emb_dims``, the syntax of ``train_block_indices`` (its range needs the model), dropouts."""
    _layer_dims(kwargs, 1)
    parse_emb_dims(kwargs.get("emb_dims"))
    parse_block_indices(kwargs.get("train_block_indices"), 10**6)
    check_training_options(kwargs, neuron_dropout)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   transformer, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    """The plug-in entry point (``network_dim`` defaults to 4 and ``network_alpha`` to 1, as in kohya)."""
    dim = network_dim or 4
    dims = _layer_dims(kwargs, dim)
    if str(kwargs.get("conv_dim", "0") or "0") not in ("0", "None"):  # the GUI's LoCon type sends it
        logger.warning("--network_args conv_dim=%s: the MMDiT's blocks have no convolutions, so it changes nothing "
                       "(the patch embedder's rank is the third value of emb_dims)", kwargs["conv_dim"])
    if not hasattr(getattr(transformer, "config", None), "joint_attention_dim"):
        raise UserError("networks.lora_sd3 is for SD3/SD3.5 MMDiTs; SD1/SDXL models use networks.lora")
    blocks = parse_block_indices(kwargs.get("train_block_indices"), transformer.config.num_layers)
    targets = _targets(_as_list(text_encoder), transformer, dims, parse_emb_dims(kwargs.get("emb_dims"), dim), blocks,
                       str(kwargs.get("train_t5xxl", "False")) == "True")
    network = LoRANetwork(_as_list(text_encoder), transformer, multiplier, dim,
                          network_alpha if network_alpha is not None else 1.0, targets=targets)
    set_training_options(network, kwargs, neuron_dropout)
    if str(kwargs.get("verbose", "False")) == "True":
        for m in network.all_loras():
            logger.info("%s: rank %d, alpha %g", m.lora_name, m.lora_down.weight.shape[0], float(m.alpha))
    return network


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, transformer,
                                weights_sd=None, for_inference: bool = False, **kwargs):
    """A network shaped like the LoRA file (ranks and alphas per module); kohya's SD3 names, or the
    diffusers/PEFT form (separate q/k/v LoRAs become kohya's fused module, exactly)."""
    state = weights_sd if weights_sd is not None else _read_lora_file(file)
    everything = {k: 1 for k in LAYER_KINDS}
    targets = _targets(_as_list(text_encoder), transformer, everything, [1] * 6,
                       set(range(transformer.config.num_layers)), train_t5=True)
    state = to_kohya_names(state, targets)
    dims, alphas = ranks_from_state(state, file)
    network = LoRANetwork(_as_list(text_encoder), transformer, multiplier, max(dims.values()), None,
                          module_dims=dims, module_alphas=alphas, targets=targets)
    unknown = sorted(set(dims) - {m.lora_name for m in network.all_loras()})
    if unknown:
        raise UserError(f"{file}: {len(unknown)} LoRA module(s) do not exist in this SD3 model, e.g. {unknown[:3]} "
                        "(a LoRA for another model?)")
    if not for_inference:  # --dim_from_weights: the training options still apply
        set_training_options(network, {k: v for k, v in kwargs.items() if k in TRAINING_ARGS},
                             kwargs.get("neuron_dropout"))
    return network, state

