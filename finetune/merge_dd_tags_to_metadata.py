"""Fold tag files into a fine-tuning metadata file (kohya's finetune/merge_dd_tags_to_metadata.py).

    python finetune/merge_dd_tags_to_metadata.py images meta_cap_dd.json --in_json meta_cap.json

Each image's ``<stem>.txt`` (``--caption_extension``, as the taggers write them) goes under ``tags`` in
the entry of that image; the entries of ``--in_json`` (or of ``out_json`` itself when it exists) are kept
and updated. Keys as merge_captions_to_metadata.py writes them (relative with extension, or absolute with
``--full_path``); the file is written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.merge_captions_to_metadata import merge_main  # noqa: E402
from library.utils.errors import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    merge_main(argv, "tags", ".txt", __doc__)


if __name__ == "__main__":
    run_cli(main)
