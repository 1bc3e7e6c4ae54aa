"""Convert a LoRA between kohya's format (what AUTOMATIC1111, Forge and ComfyUI read) and the
diffusers/PEFT form (what diffusers' ``load_lora_weights`` and PEFT read), for SD1.x/2.x, SDXL and SD3.

    python networks/convert_lora.py --model my_lora.safetensors --sd_model base.safetensors \
        --save_to my_lora-diffusers.safetensors
    python networks/convert_lora.py --model pytorch_lora_weights.safetensors --sd_model base.safetensors \
        --to kohya --save_to my_lora.safetensors

The module names of both forms depend on the model's layout (SDXL's kohya names follow SGM's
blocks), so the base checkpoint is read to place them. To diffusers, a file path gets
``load_lora_weights``' file, a folder also the PEFT adapter of the denoiser; kohya's alpha is
folded into ``lora_B`` (diffusers has no alpha) and SD3's fused q/k/v becomes three LoRAs with one
``lora_A``. To kohya, separate q/k/v LoRAs become one fused module (block-diagonal up), exactly.
Without ``--to`` the direction is the other form of the input's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from library.families import FAMILIES, LAYOUT_FAMILY  # noqa: E402
from library.maths.precision import DTYPE_NAMES  # noqa: E402
from library.models.checkpoints import LAYOUT_TITLES, checkpoint_layout, read_checkpoint  # noqa: E402
from library.utils.errors import UserError, run_cli  # noqa: E402
from library.utils.safetensors_io import save_safetensors  # noqa: E402
from networks.base import NetworkAdapter, import_network_module  # noqa: E402
from networks.lora_export import diffusers_part, peft_state_dict, write_diffusers_lora  # noqa: E402
from networks.lora_merge import read_lora  # noqa: E402
from networks.lora_names import lora_file_family  # noqa: E402

PRECISIONS = DTYPE_NAMES
FAMILY_TITLES = {name: cls.title for name, (cls, _) in FAMILIES.items()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="convert a LoRA between kohya's and the diffusers/PEFT form")
    p.add_argument("--model", required=True, help="the LoRA file")
    p.add_argument("--sd_model", required=True, help="its base checkpoint (single file): places the module names")
    p.add_argument("--save_to", required=True,
                   help="output: a .safetensors file, or (to diffusers) a folder for the file plus a PEFT adapter")
    p.add_argument("--to", choices=["kohya", "diffusers"], help="the form to write (default: the other one)")
    p.add_argument("--save_precision", choices=list(PRECISIONS), help="dtype of the output (default: the input's)")
    return p


def _is_peft(state: dict) -> bool:
    return any(k.endswith(("lora_A.weight", "lora_B.weight")) for k in state)


def convert(args: argparse.Namespace) -> Path:
    state, _ = read_lora(args.model, "--model")
    to = args.to or ("kohya" if _is_peft(state) else "diffusers")
    if Path(args.save_to).resolve() == Path(args.model).resolve():
        raise UserError(f"--save_to {args.save_to} is the input file; write to a new file")
    layout = checkpoint_layout(args.sd_model)
    family = lora_file_family(state)
    if family is not None and family != LAYOUT_FAMILY[layout]:
        raise UserError(f"--model is an {FAMILY_TITLES[family]} LoRA, --sd_model an {LAYOUT_TITLES[layout]} checkpoint")
    checkpoint = read_checkpoint(args.sd_model)
    module_name = FAMILIES[LAYOUT_FAMILY[layout]][0].default_network_module
    tes = checkpoint.text_encoders
    te = tes[0] if len(tes) == 1 else tes
    network, weights = import_network_module(module_name).create_network_from_weights(
        1.0, args.model, None, te, checkpoint.denoiser, weights_sd=state, for_inference=True)
    NetworkAdapter(network, "generate").load_for_generation(args.model, weights)
    dtype = PRECISIONS[args.save_precision] if args.save_precision else next(iter(state.values())).dtype
    out = Path(args.save_to)
    if to == "diffusers":
        if out.suffix == ".safetensors":
            save_safetensors(diffusers_part(peft_state_dict(network)), out, {"format": "pt"}, dtype=dtype,
                             model_hashes=True)
        else:
            write_diffusers_lora(network, out, dtype)
    else:
        if out.suffix != ".safetensors":
            raise UserError(f"--save_to {out}: kohya LoRAs are written as .safetensors files")
        ranks = sorted({m.lora_down.weight.shape[0] for m in network.all_loras()})
        meta = {"ss_network_module": module_name, "ss_network_dim": str(ranks[-1]) if len(ranks) == 1 else "Dynamic",
                "ss_network_alpha": "Dynamic", "ss_v2": str(layout == "sd2"),
                "ss_base_model_version": checkpoint.parts.base_model_version,
                "ss_training_comment": f"converted from the diffusers/PEFT form: {Path(args.model).name}"}
        network.save_weights(str(out), dtype, meta)
    print(f"saved {out} ({to} form, {len(network.all_loras())} modules)")
    return out


def main(argv: list[str] | None = None) -> None:
    convert(parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
