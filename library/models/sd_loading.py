"""Load and save SD1.x/2.x models: single-file checkpoints (ldm layout) and diffusers folders."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from library.maths.noise import SD_SCHEDULE
from library.models import sd_infer, sd_keys
from library.models.tokenizers import resolve_tokenizer
from library.utils.errors import UserError
from library.utils.files import save_torch
from library.utils.safetensors_io import read_header, read_tensors, save_safetensors

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class SDComponents:
    """The parts of an SD1.x/2.x model the trainers use."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    v2: bool
    #: tensors of the single file the modules do not use (SD2's last text layer, its text
    #: projection and logit scale), written back unchanged when the model is saved as a single file
    unused: dict = field(default_factory=dict)
    #: what the model predicts, when its files say so ("epsilon" / "v_prediction"); single files do not
    prediction_type: str | None = None

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def text_encoder_list(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    @property
    def base_model_version(self) -> str:
        """kohya's ss_base_model_version."""
        return ("sd_v2_v" if self.prediction_type == "v_prediction" else "sd_v2") if self.v2 else "sd_v1"


def read_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or pickle (``.ckpt``/``.pt``/``.bin``) checkpoint.

    Pickles are opened with ``weights_only=True``: a file that needs arbitrary code to load is
    refused. A safetensors header larger than 100 MiB, or longer than the file, is refused too.
    ``device="meta"`` gives the tensors' shapes and dtypes only (from the header of a safetensors
    file): enough to build a model skeleton and check what will be merged into it before loading.
    ``prefixes``: only the tensors whose keys start with one of them (a safetensors file's other
    tensors, e.g. an original SD1.5 file's EMA copy of the UNet, are never read). ``dtype``: a
    safetensors file's floating tensors are cast as each is read, so the file's own precision is
    never held beside the wanted one (a pickle is mapped, and its tensors are cast when adopted).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (check --pretrained_model_name_or_path)")
    if path.suffix == ".safetensors" and str(device) == "meta":
        return {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in read_header(path).tensors.items()
                if prefixes is None or k.startswith(prefixes)}
    if path.suffix == ".safetensors":  # read tensor by tensor: no mapping of the whole file is kept
        return read_tensors(path, device, dtype, prefixes)
    try:
        obj = torch.load(str(path), map_location=device, weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path} could not be loaded safely as a checkpoint: {str(exc).splitlines()[0]}. "
                        "Only plain tensor checkpoints are accepted; convert it to .safetensors.") from exc
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not contain a state dict")
    return {k: v for k, v in obj.items()
            if isinstance(v, torch.Tensor) and (prefixes is None or k.startswith(prefixes))}


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """Name the model family of a single-file state dict from its keys."""
    if any(k.startswith("conditioner.embedders.") for k in state):
        return "sdxl"
    if any(k.startswith("model.diffusion_model.joint_blocks.") for k in state):
        return "sd3"
    if "model.diffusion_model.input_blocks.0.0.weight" in state:
        if any(k.startswith("cond_stage_model.model.") for k in state):
            return "sd2"
        return "sd1"
    return "unknown"


_LAYOUT_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3"}
#: which script trains a file of each layout (a LoRA; the full-weight trainers pass their own)
NETWORK_SCRIPTS = {"sd1": "train_network.py", "sd2": "train_network.py", "sdxl": "sdxl_train_network.py",
                   "sd3": "sd3_train_network.py"}


def require_layout(state: Mapping[str, torch.Tensor], accepted: tuple[str, ...], path,
                   scripts: Mapping[str, str] = NETWORK_SCRIPTS) -> str:
    """The file's layout if it is one of ``accepted``; otherwise one message saying what the file
    looks like and which script reads it (``scripts``). Every loader checks its input through this."""
    layout = detect_layout(state)
    if layout in accepted:
        return layout
    wanted = "/".join(_LAYOUT_NAMES[a] for a in accepted)
    script = scripts.get(layout)
    hint = f"; use {script}" if script else ""
    raise UserError(f"{path} is not an {wanted} checkpoint (it looks like: {layout}){hint}")


def read_checked_state_dict(path: str | os.PathLike, accepted: tuple[str, ...], device: str | torch.device = "cpu",
                            dtype: torch.dtype | None = None,
                            prefixes: tuple[str, ...] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """:func:`read_state_dict` of a file whose layout must be one of ``accepted`` (checked on all
    its keys, from the header of a safetensors file before any tensor is read); returns the
    tensors and the layout."""
    if Path(path).suffix == ".safetensors" and Path(path).is_file():
        layout = require_layout(read_header(path).tensors, accepted, path)
        return read_state_dict(path, device, dtype, prefixes), layout
    state = read_state_dict(path, device)  # a pickle is mapped: its keys cost no memory
    layout = require_layout(state, accepted, path)
    return ({k: v for k, v in state.items() if k.startswith(prefixes)} if prefixes else state), layout


def check_file_layout(path: str, accepted: tuple[str, ...], scripts: Mapping[str, str] = NETWORK_SCRIPTS) -> None:
    """Refuse a single ``.safetensors`` file of another family from its header alone (no tensor is
    read), so a wrong model stops the run before the dataset is scanned or anything is loaded.
    Folders, hub ids and pickles are checked when they are loaded."""
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return
    require_layout(read_header(p).tensors, accepted, p, scripts)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Take the tensors under ``prefix`` out of ``state`` (popped, so that no second reference
    keeps them alive once they are converted)."""
    return {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}


def _build(cls, config, state: dict[str, torch.Tensor], dtype, what: str, path) -> torch.nn.Module:
    """Instantiate ``cls`` without allocating random weights, then adopt ``state``'s tensors."""
    with init_empty_weights(include_buffers=False):
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    # convert one tensor at a time, dropping the source as we go: never two full copies in memory
    converted = {}
    for key in list(state):
        value = state.pop(key)
        converted[key] = value.to(dtype) if value.is_floating_point() else value
    result = model.load_state_dict(converted, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{path}: the {what} weights do not match the detected architecture "
                        f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model.eval().requires_grad_(False)


#: the parts of an SD1.x/2.x single file the modules are built from (both text encoders' prefixes)
_SD_PREFIXES = (sd_keys.UNET_PREFIX, sd_keys.VAE_PREFIX, "cond_stage_model.")


def load_sd_single_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        tokenizer_dir: str | None = None, device: torch.device | None = None,
                        with_tokenizer: bool = True) -> SDComponents:
    """Load an SD1.x or SD2.x single-file checkpoint (original key layout) into diffusers/transformers
    modules; the architecture comes from the tensor shapes. The file tools need no tokenizer
    (``with_tokenizer=False``: none is looked for)."""
    state, layout = read_checked_state_dict(path, ("sd1", "sd2"), device or "cpu", dtype, _SD_PREFIXES)
    v2 = layout == "sd2"
    unet_ldm = _strip(state, sd_keys.UNET_PREFIX)
    unet_cfg = sd_infer.infer_unet_config(unet_ldm, v2=v2)
    unet_state = sd_keys.unet_from_ldm(unet_ldm, _Cfg(unet_cfg))
    del unet_ldm
    unet = _build(UNet2DConditionModel, unet_cfg, unet_state, dtype, "UNet", path)
    vae_ldm = _strip(state, sd_keys.VAE_PREFIX)
    vae_cfg = sd_infer.infer_vae_config(vae_ldm)
    vae_state = sd_keys.vae_from_ldm(vae_ldm, _Cfg(vae_cfg))
    del vae_ldm
    vae = _build(AutoencoderKL, vae_cfg, vae_state, dtype, "VAE", path)
    text_encoder, unused = _text_encoder_from_ldm(state, v2, dtype, path)
    tokenizer = resolve_clip_tokenizer(Path(path), tokenizer_dir, v2=v2) if with_tokenizer else None
    return SDComponents(unet, vae, text_encoder, tokenizer, v2=v2, unused=unused)


def _text_encoder_from_ldm(state: dict, v2: bool, dtype, path) -> tuple[torch.nn.Module, dict]:
    """CLIP-L (SD1) or the OpenCLIP-H tower (SD2, converted and cut before its last layer)."""
    if v2:
        ldm = _strip(state, sd_keys.OPEN_CLIP_PREFIX)
        cfg_kwargs, keep = sd_infer.infer_open_clip_config(ldm)
        cfg = CLIPTextConfig(**cfg_kwargs)
        with torch.device("meta"):
            flat = not any(k.startswith("text_model.") for k in CLIPTextModel(cfg).state_dict())
        converted, unused = sd_keys.open_clip_from_ldm(ldm, keep, flat)
    else:
        ldm = _strip(state, sd_keys.CLIP_L_PREFIX)
        cfg = CLIPTextConfig(**sd_infer.infer_clip_l_config(ldm))
        with torch.device("meta"):
            model_keys = list(CLIPTextModel(cfg).state_dict())
        converted, unused = sd_keys.clip_from_ldm(ldm, model_keys), {}
    return _build(CLIPTextModel, cfg, converted, dtype, "text encoder", path), unused


class _Cfg:
    """Attribute view of a config dict (the key maps read configs by attribute)."""

    def __init__(self, d: dict):
        self.__dict__.update(d)


def resolve_clip_tokenizer(ckpt: Path, tokenizer_dir: str | None, v2: bool):
    """The CLIP tokenizer of an SD1.x/2.x single file (see :mod:`library.models.tokenizers`)."""
    return resolve_tokenizer("sd2" if v2 else "clip_l", ckpt, tokenizer_dir)


def load_sd_diffusers(name_or_path: str, dtype: torch.dtype = torch.float32,
                      device: torch.device | None = None) -> SDComponents:
    """Load from a diffusers folder or hub id (the hub cache is used when offline)."""

    place = {"device_map": str(device)} if device is not None else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", torch_dtype=dtype, **place)
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", torch_dtype=dtype, **place)
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", torch_dtype=dtype,
                                                     **place)
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load a diffusers model from {name_or_path}: {str(exc).splitlines()[0]}") from exc
    if len(tokenizer) <= 256:  # transformers 5 gives an empty tokenizer instead of an error
        raise UserError(f"{name_or_path}: no usable tokenizer (tokenizer/ is missing or empty)")
    v2 = text_encoder.config.hidden_size == 1024 or text_encoder.config.hidden_act == "gelu"
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return SDComponents(unet, vae, text_encoder, tokenizer, v2=v2,
                        prediction_type=_scheduler_prediction_type(name_or_path))


def _scheduler_prediction_type(name_or_path: str) -> str | None:
    """What a diffusers folder's scheduler says the model predicts (None if it does not say)."""
    path = Path(name_or_path) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("prediction_type")
    except ValueError:
        return None


def load_vae(path: str, dtype: torch.dtype = torch.float32, latent_channels: int = 4,
             device: torch.device | None = None) -> torch.nn.Module:
    """A separate VAE (``--vae``): a single file in the original layout (with or without the
    ``first_stage_model.`` prefix) or in diffusers' layout, or a diffusers folder."""
    p = Path(path)
    if p.is_dir():
        sub = {"subfolder": "vae"} if (p / "vae").is_dir() else {}
        try:
            vae = AutoencoderKL.from_pretrained(str(p), torch_dtype=dtype, **sub)
        except (OSError, ValueError) as exc:
            raise UserError(f"--vae {p}: not a diffusers VAE folder ({str(exc).splitlines()[0]})") from exc
    else:
        state = read_state_dict(p, device or "cpu")
        if any(k.startswith(sd_keys.VAE_PREFIX) for k in state):
            state = _strip(state, sd_keys.VAE_PREFIX)
        if "encoder.down_blocks.0.resnets.0.conv1.weight" in state:  # diffusers names: to the original ones
            state = _strip(sd_keys.vae_to_ldm(state, _Cfg(_diffusers_vae_shape(state))), sd_keys.VAE_PREFIX)
        if "encoder.conv_in.weight" not in state or "encoder.conv_out.weight" not in state:
            raise UserError(f"--vae {p}: this file holds no VAE (no encoder.conv_in / conv_out weights)")
        cfg = sd_infer.infer_vae_config(state)
        vae = _build(AutoencoderKL, cfg, sd_keys.vae_from_ldm(state, _Cfg(cfg)), dtype, "VAE", p)
    if vae.config.latent_channels != latent_channels:
        raise UserError(f"--vae {p}: it makes {vae.config.latent_channels}-channel latents, this model needs "
                        f"{latent_channels} (is it an SD3/FLUX VAE?)")
    return vae.eval().requires_grad_(False)


def _diffusers_vae_shape(state: Mapping[str, torch.Tensor]) -> dict:
    levels = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))}
    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    return {"block_out_channels": [0] * len(levels), "layers_per_block": len(layers)}


def load_sd_model(name_or_path: str, dtype: torch.dtype = torch.float32,
                  tokenizer_dir: str | None = None, device: torch.device | None = None) -> SDComponents:
    """Load an SD1.x/2.x model from a single file, a diffusers folder or a hub id."""
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / "model_index.json").is_file() and not (p / "unet").is_dir():
            raise UserError(f"{p} is a folder but not a diffusers model (no model_index.json or unet/)")
        return load_sd_diffusers(str(p), dtype, device)
    if p.is_file() or p.suffix in CHECKPOINT_SUFFIXES:
        return load_sd_single_file(p, dtype, tokenizer_dir, device)  # a missing file is reported there
    return load_sd_diffusers(name_or_path, dtype, device)


def save_sd_diffusers(folder: str | os.PathLike, parts: SDComponents, dtype: torch.dtype | None = None,
                      prediction_type: str = "epsilon") -> None:
    """Write a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json)
    that ``StableDiffusionPipeline.from_pretrained`` and our loader read."""
    write_diffusers_folder(folder, "StableDiffusionPipeline",
                           {"unet": parts.unet, "vae": parts.vae, "text_encoder": parts.text_encoder},
                           {"tokenizer": parts.tokenizer}, dtype, prediction_type)


def write_diffusers_folder(folder: str | os.PathLike, pipeline_class: str, modules: dict, tokenizers: dict,
                           dtype: torch.dtype | None = None, prediction_type: str = "epsilon",
                           scheduler=None) -> None:
    """Write ``modules`` and ``tokenizers`` (keyed by their diffusers folder names; None for an
    absent part), the scheduler (DDIM with the SD schedule unless given) and model_index.json as a
    diffusers pipeline folder. Written to a temporary folder and renamed into place, so an
    interrupted save never leaves a half folder under the real name."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    index: dict = {"_class_name": pipeline_class}
    for name, part in {**modules, **tokenizers}.items():
        if part is None:
            index[name] = [None, None]
            continue
        built = _built_class(part)
        library = "diffusers" if built.__module__.startswith("diffusers") else "transformers"
        if name in modules:
            _save_module(part, tmp / name, library, dtype)
        else:
            part.save_pretrained(str(tmp / name))
        index[name] = [library, built.__name__]
    if scheduler is None:
        scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                                  prediction_type=prediction_type)
    scheduler.save_pretrained(str(tmp / "scheduler"))
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    if pipeline_class == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def _built_class(module: torch.nn.Module) -> type:
    """The class ``module`` was made as: torch's FSDP2 (``--deepspeed`` runs) swaps a sharded
    module's class for a generated subclass (``FSDPUNet2DConditionModel``) that no loader knows."""
    from torch.distributed.fsdp import FSDPModule
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def _fix_class_name(config_file: Path, name: str) -> None:
    """diffusers writes the module's own class name into its config (``_class_name``), which for a
    sharded module is FSDP's generated one."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("_class_name") != name:
        config["_class_name"] = name
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_module(module: torch.nn.Module, folder: Path, library: str, dtype: torch.dtype | None) -> None:
    """A diffusers or transformers module as its from_pretrained reads it: the config, and the
    weights in one safetensors file written tensor by tensor (cast on the way; the libraries' own
    save_pretrained builds each file's bytes in memory first, a second copy of the model)."""
    folder.mkdir(parents=True)
    if library == "diffusers":
        module.save_config(str(folder))
        _fix_class_name(folder / "config.json", _built_class(module).__name__)
        weights = folder / "diffusion_pytorch_model.safetensors"
    else:
        module.config.save_pretrained(str(folder))
        weights = folder / "model.safetensors"
    state = module.state_dict()
    for key in getattr(module, "_tied_weights_keys", None) or ():  # {tied: source}: tied again on loading
        state.pop(key, None)
    save_safetensors(state, weights, {"format": "pt"}, dtype=dtype)


def checkpoint_pickle(state: dict, metadata: dict[str, str] | None) -> dict:
    """A .ckpt's contents: the state dict, and ``epoch`` / ``global_step`` from the metadata as the
    original trainers stored them (the rest of the metadata has no place in a pickle)."""
    extras = {k: int(v) for k, v in (metadata or {}).items() if k in ("epoch", "global_step")}
    return {"state_dict": state, **extras}


def save_sd_single_file(path: str | os.PathLike, parts: SDComponents, dtype: torch.dtype | None = None,
                        metadata: dict[str, str] | None = None, progress: bool = False) -> None:
    """Write a single-file checkpoint in the original ldm key layout (what A1111/ComfyUI load)."""
    state = {}
    state.update(sd_keys.unet_to_ldm(parts.unet.state_dict(), parts.unet.config))
    state.update(sd_keys.vae_to_ldm(parts.vae.state_dict(), parts.vae.config))
    if parts.v2:
        if not parts.unused:
            raise UserError("this SD2 model has no last text-encoder layer to write (it was not loaded from a "
                            "single file); save it as a diffusers folder")
        state.update(sd_keys.open_clip_to_ldm(parts.text_encoder.state_dict(), parts.unused))
    else:
        state.update(sd_keys.clip_to_ldm(parts.text_encoder.state_dict()))
    write_single_file(state, path, dtype, metadata, progress)


def write_single_file(state: dict[str, torch.Tensor], path: str | os.PathLike, dtype: torch.dtype | None,
                      metadata: dict[str, str] | None, progress: bool = False) -> None:
    """A single-file checkpoint's tensors to ``.safetensors`` (cast tensor by tensor as they are
    written, with kohya's model hashes) or to a ``.ckpt`` pickle (cast first: torch.save needs them).
    ``progress``: a bar of the bytes written (safetensors)."""
    if str(path).endswith(".safetensors"):
        total = sum(v.numel() * (dtype if dtype is not None and v.is_floating_point() else v.dtype).itemsize
                    for v in state.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {Path(path).name}",
                  disable=not progress) as bar:
            save_safetensors(state, path, metadata, dtype=dtype, model_hashes=True, progress=bar.update)
        return
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_torch(checkpoint_pickle(state, metadata), path)
