"""Summarise a LoRA file (kohya's networks/check_lora_weights.py): one line per module with its
shapes, rank, alpha and the mean and smallest |w| of its up and down weights, the modules whose
update is zero (never trained, or zeroed), and which model family the file is for.

    python networks/check_lora_weights.py my_lora.safetensors [--show_all]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.families import FAMILIES  # noqa: E402
from library.utils.errors import run_cli  # noqa: E402
from networks.lora_merge import lora_modules, read_lora  # noqa: E402
from networks.lora_names import lora_file_family  # noqa: E402

FAMILY_TITLES = {name: cls.title for name, (cls, _) in FAMILIES.items()}


def summary_lines(path: str, show_all: bool = False) -> list[str]:
    """The report, as lines (the summary first; every module with ``show_all``, else the first 20)."""
    state, metadata = read_lora(path, "file")
    modules = lora_modules(state, path)
    family = lora_file_family(state)
    ranks = sorted({down.shape[0] for down, _, _ in modules.values()})
    alphas = sorted({alpha for _, _, alpha in modules.values()})
    zero = [name for name, (_, up, _) in modules.items() if not up.abs().max() > 0]
    te = sum(1 for name in modules if name.startswith("lora_te"))
    lines = [f"{path}: a {FAMILY_TITLES.get(family, 'LoRA of unknown family')}"
             f"{' LoRA' if family else ''} with {len(modules)} modules ({te} text encoder, {len(modules) - te} "
             f"denoiser); rank {', '.join(map(str, ranks))}; alpha {', '.join(f'{a:g}' for a in alphas)}"]
    if metadata.get("ss_network_module"):
        lines.append(f"trained with {metadata['ss_network_module']} (dim {metadata.get('ss_network_dim')}, alpha "
                     f"{metadata.get('ss_network_alpha')}), {metadata.get('ss_steps', '?')} steps")
    lines.append(f"{len(zero)} module(s) with a zero update" + (f", e.g. {zero[:3]}" if zero else ""))
    shown = list(modules.items()) if show_all else list(modules.items())[:20]
    for name, (down, up, alpha) in shown:
        lines.append(f"  {name}: down {tuple(down.shape)} up {tuple(up.shape)} rank {down.shape[0]} alpha {alpha:g} "
                     f"| mean |up| {up.abs().mean():.3e} min {up.abs().min():.3e} "
                     f"| mean |down| {down.abs().mean():.3e} min {down.abs().min():.3e}")
    if len(shown) < len(modules):
        lines.append(f"  ... {len(modules) - len(shown)} more (--show_all)")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="summarise a LoRA file")
    p.add_argument("file", help="LoRA file (.safetensors, .ckpt, .pt)")
    p.add_argument("-s", "--show_all", action="store_true", help="a line for every module")
    args = p.parse_args(argv)
    print("\n".join(summary_lines(args.file, args.show_all)))


if __name__ == "__main__":
    run_cli(main)
