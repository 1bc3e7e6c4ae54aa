"""ControlNet-LLLite (kohya's light ControlNet for SDXL) in gen_img.py, over diffusers' UNet.

An LLLite file holds small modules named after the SDXL UNet linear layers they feed
(``lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``): the query/key/value of self
attention and the query of cross attention in the input and middle blocks. Each embeds the guide
image once per batch (``conditioning1``: strided convolutions down to its block's resolution) and,
at every step, adds ``up(mid([embedding, down(x)])) * multiplier`` to the layer's input x. The guide
image is given in [-1, 1]; the modules' depth (1-3) is their block's resolution level.

Installed with forward pre-hooks on diffusers' layers, so the UNet, LoRAs and the pipelines run
unchanged; with no guide set the hooks do nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from library.models.sd_keys import unet_module_to_ldm
from library.sampling.controlnet import preprocess
from library.utils.errors import UserError

PREFIX = "lllite_unet_"


def _conditioning(depth: int, cond_dim: int) -> nn.Sequential:
    """The guide image -> the block's resolution: /8, /16 or /32 (the layer indices are the file's)."""
    half = cond_dim // 2
    layers = [nn.Conv2d(3, half, kernel_size=4, stride=4)]
    if depth == 1:
        layers += [nn.ReLU(), nn.Conv2d(half, cond_dim, kernel_size=2, stride=2)]
    elif depth == 2:
        layers += [nn.ReLU(), nn.Conv2d(half, cond_dim, kernel_size=4, stride=4)]
    else:
        layers += [nn.ReLU(), nn.Conv2d(half, half, kernel_size=4, stride=4), nn.ReLU(),
                   nn.Conv2d(half, cond_dim, kernel_size=2, stride=2)]
    return nn.Sequential(*layers)


class LLLiteModule(nn.Module):
    def __init__(self, depth: int, in_dim: int, cond_dim: int, mlp_dim: int):
        super().__init__()
        self.conditioning1 = _conditioning(depth, cond_dim)
        self.down = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(mlp_dim + cond_dim, mlp_dim), nn.ReLU())
        self.up = nn.Sequential(nn.Linear(mlp_dim, in_dim))
        self.cond_emb: torch.Tensor | None = None
        self.multiplier = 1.0

    def set_cond_image(self, image: torch.Tensor | None) -> None:
        """Embed the guide image (B, 3, H, W) in [-1, 1] as (B, tokens, cond_dim), or switch off."""
        if image is None:
            self.cond_emb = None
            return
        emb = self.conditioning1(image.to(self.up[0].weight.dtype))
        self.cond_emb = emb.flatten(2).transpose(1, 2)

    def pre_hook(self, module, args):
        x = args[0]
        if self.cond_emb is None or self.multiplier == 0:
            return None
        # the pipeline's batch holds the images several times (negative and positive prompts)
        cond = self.cond_emb.repeat(x.shape[0] // self.cond_emb.shape[0], 1, 1).to(x.dtype)
        delta = self.up(self.mid(torch.cat([cond, self.down(x)], dim=-1))) * self.multiplier
        return (x + delta, *args[1:])


def lllite_targets(unet) -> dict[str, tuple[str, int]]:
    """kohya name -> (diffusers module path, depth) of every layer an SDXL LLLite can feed."""
    targets = {}
    for path, module in unet.named_modules():
        if not isinstance(module, nn.Linear) or ".attentions." not in f".{path}":
            continue
        if not path.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")):
            continue
        head = path.split(".")
        if head[0] == "down_blocks":
            depth = int(head[1]) + 1
        elif head[0] == "mid_block":
            depth = len(unet.down_blocks)
        else:
            continue  # kohya's LLLite leaves the output blocks alone
        targets[PREFIX + unet_module_to_ldm(path, unet.config).replace(".", "_")] = (path, depth)
    return targets


class LLLite(nn.Module):
    """The modules of one LLLite file, hooked into ``unet``."""

    def __init__(self, unet, state: dict[str, torch.Tensor], source: str):
        super().__init__()
        targets = lllite_targets(unet)
        names = sorted({k.split(".")[0] for k in state})
        unknown = [n for n in names if n not in targets]
        if not names or unknown:
            raise UserError(f"--control_net_lllite_models {source}: {len(unknown)} of its {len(names)} modules do not "
                            f"name a layer of this UNet (e.g. {unknown[:1]}); LLLite files are for SDXL models")
        self.hooked = nn.ModuleDict()
        layers = dict(unet.named_modules())
        for name in names:
            path, depth = targets[name]
            cond_dim = state[f"{name}.conditioning1.0.weight"].shape[0] * 2
            mlp_dim, in_dim = state[f"{name}.down.0.weight"].shape
            self.hooked[name] = LLLiteModule(depth, in_dim, cond_dim, mlp_dim)
        try:
            self.hooked.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UserError(f"--control_net_lllite_models {source}: not an LLLite file this loader reads "
                            f"({str(exc).splitlines()[0]})") from exc
        self.handles = [layers[targets[name][0]].register_forward_pre_hook(module.pre_hook)
                        for name, module in self.hooked.items()]

    def set_cond_image(self, image: torch.Tensor | None) -> None:
        with torch.no_grad():
            for module in self.hooked.values():
                module.set_cond_image(image)

    def set_multiplier(self, value: float) -> None:
        for module in self.hooked.values():
            module.multiplier = value


@dataclass(frozen=True)
class LLLiteUse:
    network: LLLite
    prep: str = "none"
    multiplier: float = 1.0
    ratio: float = 1.0


def guide_tensor(guides: list, prep: str, width: int, height: int, device) -> torch.Tensor:
    """The batch's guide images, preprocessed and resized, as (B, 3, H, W) in [-1, 1]."""
    arrays = [np.asarray(preprocess(g, prep).resize((width, height)), dtype=np.float32) / 127.5 - 1 for g in guides]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device)


class LLLiteSchedule:
    """Sets each LLLite's guide for a batch and switches it off after its ratio of the steps
    (kohya: off once ratio < step / steps), through the pipelines' ``callback_on_step_end``."""

    def __init__(self, uses: tuple, guides: list, width: int, height: int, device):
        self.uses = uses
        for use in uses:
            use.network.set_multiplier(use.multiplier)
            use.network.set_cond_image(guide_tensor(guides, use.prep, width, height, device))

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        for use in self.uses:
            if use.ratio < (step + 1) / pipe.num_timesteps:
                use.network.set_cond_image(None)
        return {}

    def close(self) -> None:
        for use in self.uses:
            use.network.set_cond_image(None)
