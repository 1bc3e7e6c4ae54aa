"""Print the metadata of a safetensors file (kohya's tools/show_metadata.py): the header's
``ss_*`` / ``modelspec.*`` / ``sshs_*`` entries, with JSON values (tag frequencies, datasets, merge
trails) decoded and indented.

    python tools/show_metadata.py --model my_lora.safetensors [--raw]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors import safe_open  # noqa: E402

from library.utils.errors import UserError, run_cli  # noqa: E402


def read_metadata(path: str) -> dict[str, str]:
    if not Path(path).is_file():
        raise UserError(f"--model {path}: file not found")
    if not path.endswith(".safetensors"):
        raise UserError(f"--model {path}: only .safetensors files carry metadata")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors' errors for a truncated or foreign file vary
        raise UserError(f"--model {path}: not a readable safetensors file ({exc})") from exc


def decoded(metadata: dict[str, str]) -> dict:
    """Values that hold JSON (objects, lists) decoded; the rest kept as the strings they are."""
    out = {}
    for key, value in sorted(metadata.items()):
        if isinstance(value, str) and value[:1] in "[{":
            try:
                out[key] = json.loads(value)
                continue
            except ValueError:
                pass
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="print a safetensors file's metadata")
    p.add_argument("--model", required=True, help="a .safetensors file (LoRA or checkpoint)")
    p.add_argument("--raw", action="store_true", help="the strings as stored, without decoding JSON values")
    args = p.parse_args(argv)
    metadata = read_metadata(args.model)
    if not metadata:
        print(f"{args.model}: no metadata")
        return
    print(json.dumps(metadata if args.raw else decoded(metadata), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    run_cli(main)
