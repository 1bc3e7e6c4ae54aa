"""kohya's SDXL name for networks/merge_lora.py: the same tool (the family is read from the files).

    python networks/sdxl_merge_lora.py --sd_model sdxl.safetensors --models a.safetensors --ratios 0.8 \
        --save_to merged.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.utils.errors import run_cli  # noqa: E402
from networks.merge_lora import main  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
