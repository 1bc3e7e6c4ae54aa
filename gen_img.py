"""gen_img.py: not available in this version yet.

This script keeps kohya-ss/sd-scripts' name so command lines find it; it is tracked in issue #8
of this project. Running it stops with a clear message instead of doing something half-way.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    print("error: gen_img.py is not implemented in this version yet (tracked in issue #8); "
          "train_network.py (SD1.x/2.x LoRA) is available", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
