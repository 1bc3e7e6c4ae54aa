"""LoRA-FA (``--network_module networks.lora_fa``; Zhang et al. 2023, "LoRA-FA: Memory-efficient
low-rank adaptation"): LoRA whose ``lora_down`` keeps its random start and is never trained, so
only ``lora_up`` learns and no gradient or optimizer state is kept for the down projections.

Everything else is networks.lora's: the same targets, network_args, and kohya's file format (the
frozen ``lora_down`` is saved, since the update needs it), so the files load anywhere a LoRA does.
"""

from __future__ import annotations

from torch import nn

from networks import lora

#: create_network_from_weights reads every rank and option from the file (no --network_args at generation)
SHAPE_FROM_FILE = True


class LoRAFANetwork(lora.LoRANetwork):
    """networks.lora with the down projections frozen."""

    def _trained(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in module.named_parameters() if not n.startswith("lora_down")]


def check_network_args(kwargs: dict, family: str, neuron_dropout: float | None = None) -> None:
    lora.check_network_args(kwargs, family, neuron_dropout)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs) -> LoRAFANetwork:
    """networks.lora's entry point (same args and defaults) building a LoRA-FA network."""
    return lora.build_from_args(LoRAFANetwork, multiplier, network_dim, network_alpha, text_encoder, unet,
                                neuron_dropout, kwargs)


def create_network_from_weights(multiplier: float, file: str | None, vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs):
    """A network shaped like the file; for training (``--dim_from_weights``) the downs stay frozen."""
    return lora.build_from_file(LoRAFANetwork, multiplier, file, text_encoder, unet, weights_sd, for_inference,
                                kwargs)
