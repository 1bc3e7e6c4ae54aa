"""Building the trained network on the loaded models: LoRA files merged into the base first
(``--base_weights``), the network from its args or from a file's ranks (``--dim_from_weights``),
its starting weights, and the checks that can run before any model is loaded."""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import toml
import torch
from safetensors import safe_open

from library.config.training_config import NetworkConfig
from library.families import FAMILIES
from library.families.base import LoadedModels, ModelFamily
from library.utils.errors import UserError
from networks.base import NetworkAdapter, import_network_module
from networks.lora_names import lora_file_family

logger = logging.getLogger(__name__)



def check_network_setup(net_cfg: NetworkConfig, family: ModelFamily) -> None:
    """What can be checked before the models load: the network args (by the plug-in's
    ``check_network_args``, where it has one), and LoRA files given to start from or to merge that
    name another model family's modules (safetensors headers only; other files are checked when
    they are read)."""
    check = getattr(import_network_module(net_cfg.module), "check_network_args", None)
    if callable(check):
        check(net_cfg.args, family.name, net_cfg.dropout)
    files = [("--network_weights", net_cfg.weights)] if net_cfg.weights else []
    files += [("--base_weights", path) for path, _ in net_cfg.base_weights]
    for flag, path in files:
        if not str(path).endswith(".safetensors"):
            continue
        try:
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
        except Exception as exc:  # a truncated or foreign file: safetensors' own errors vary
            raise UserError(f"{flag} {path}: not a readable safetensors file ({exc})") from exc
        found = lora_file_family(keys)
        if found is not None and found != family.name:
            raise UserError(f"{flag} {path}: its keys are those of a {FAMILIES[found][0].title} LoRA, but this "
                            f"script trains {family.title or family.name} models; use a LoRA of this model family")


def merge_base_weights(net_cfg: NetworkConfig, models: LoadedModels, device) -> None:
    """kohya's ``--base_weights``: each file built as a network by ``--network_module`` and merged
    into the base weights at its ``--base_weights_multiplier``; the trained network goes on top."""
    if not net_cfg.base_weights:
        return
    module = import_network_module(net_cfg.module)
    if not callable(getattr(module, "create_network_from_weights", None)):
        raise UserError(f"--base_weights: {net_cfg.module} has no create_network_from_weights() to read them")
    te = models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders
    for path, multiplier in net_cfg.base_weights:
        network, weights = module.create_network_from_weights(multiplier, path, models.vae, te, models.denoiser,
                                                              for_inference=True)
        adapter = NetworkAdapter(network, "generate")
        try:
            adapter.merge_to(te, models.denoiser, weights, models.denoiser.dtype, device)
        except RuntimeError as exc:  # shapes of another model (an SD1 LoRA on SD2)
            raise UserError(f"--base_weights {path}: its tensors do not fit this model "
                            f"({str(exc).splitlines()[-1].strip()})") from exc
        logger.info("merged %s into the base model at strength %g", Path(path).name, multiplier)


def _covered_twice(preset: dict, names_key: str, classes_key: str, model: torch.nn.Module) -> list[str]:
    """Names a LyCORIS preset lists that one of its target classes already reaches from above."""
    modules = dict(model.named_modules())
    classes = set(preset.get(classes_key) or [])
    twice = []
    for name in preset.get(names_key) or []:
        parts = name.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]
        if name in modules and any(type(modules.get(a)).__name__ in classes for a in ancestors):
            twice.append(name)
    return twice


@contextmanager
def lycoris_preset_args(module_name: str, args: dict, models: LoadedModels):
    """LyCORIS's built-in presets name some modules twice on diffusers' models: ``full`` (its
    default) targets the ``TimestepEmbedding`` class and also lists ``time_embedding.linear_1/2`` by
    name, and lycoris then stops on the duplicated module name. The same preset is passed as a file
    without the names its classes already cover (the same modules are trained); the user's args
    (and the saved metadata) are left as given."""
    name = args.get("preset", "full")
    if not module_name.startswith("lycoris") or Path(name).suffix == ".toml":
        yield args
        return
    from lycoris.config import PRESET  # an optional package: only lycoris networks need it

    preset = PRESET.get(name)
    if preset is None:
        yield args
        return
    twice = {"unet_target_name": _covered_twice(preset, "unet_target_name", "unet_target_module", models.denoiser)}
    twice["text_encoder_target_name"] = sorted({n for te in models.text_encoders for n in _covered_twice(
        preset, "text_encoder_target_name", "text_encoder_target_module", te)})
    if not any(twice.values()):
        yield args
        return
    logger.info("lycoris preset %s: %s are reached through their target classes already; passed once", name,
                ", ".join(n for names in twice.values() for n in names))
    fixed = {k: ([n for n in v if n not in twice[k]] if k in twice else v) for k, v in preset.items()}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.toml"
        path.write_text(toml.dumps(fixed), encoding="utf-8")
        yield {**args, "preset": str(path)}


def _create(module, net_cfg: NetworkConfig, models: LoadedModels, te, kwargs: dict):
    """The plug-in's network, from its args or (``--dim_from_weights``) from the file's shapes."""
    with lycoris_preset_args(net_cfg.module, kwargs, models) as plugin_args:
        if net_cfg.dim_from_weights:
            if not callable(getattr(module, "create_network_from_weights", None)):
                raise UserError(f"--dim_from_weights: {net_cfg.module} has no create_network_from_weights()")
            network, _ = module.create_network_from_weights(1.0, net_cfg.weights, models.vae, te, models.denoiser,
                                                            **plugin_args)
            return network
        return module.create_network(1.0, net_cfg.dim, net_cfg.alpha, models.vae, te, models.denoiser,
                                     **plugin_args)


def build_network(net_cfg: NetworkConfig, models: LoadedModels, diffusers_export: bool) -> NetworkAdapter:
    """The network to train, hooked into the models, with ``--network_weights`` loaded."""
    module = import_network_module(net_cfg.module)
    te = models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders
    # passed only when given, so plug-ins written without dropout still build
    kwargs = dict(net_cfg.args, **({"neuron_dropout": net_cfg.dropout} if net_cfg.dropout is not None else {}))
    try:
        network = _create(module, net_cfg, models, te, kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise UserError(f"--network_module {net_cfg.module} could not build the network: {exc}") from exc
    if network is None:
        raise UserError(f"--network_module {net_cfg.module}: create_network returned nothing")
    adapter = NetworkAdapter(network)
    if diffusers_export and not adapter.capabilities.exports_diffusers:
        raise UserError(f"--save_lora_format diffusers: {net_cfg.module} networks cannot be written in the "
                        "diffusers form; use networks.lora / networks.lora_sd3 or the kohya format")
    if net_cfg.scale_weight_norms and not adapter.capabilities.can_max_norm:
        raise UserError(f"--scale_weight_norms: {net_cfg.module} networks have no apply_max_norm_regularization(); "
                        "train without --scale_weight_norms")
    adapter.apply_to(te, models.denoiser, net_cfg.train_text_encoder, net_cfg.train_unet)
    if net_cfg.weights:
        logger.info("network weights: %s", adapter.load_weights(net_cfg.weights))
    if net_cfg.dim_from_weights:
        shapes = [m.lora_down.weight.shape[0] for m in adapter.text_encoder_modules() + adapter.unet_modules()]
        if shapes:
            logger.info("--dim_from_weights: %d modules, ranks %d-%d from %s", len(shapes), min(shapes), max(shapes),
                        net_cfg.weights)
    return adapter
