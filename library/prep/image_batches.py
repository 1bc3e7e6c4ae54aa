"""Images decoded and prepared in batches, in the main process or in data-loader workers
(``--max_data_loader_n_workers``), with unreadable files left out and named instead of stopping
the run (kohya's scripts crash on the first broken image unless workers are used)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.data.images import load_image_rgb
from library.prep.files import RunSummary

Prepare = Callable[[np.ndarray], object]


class _PreparedImages(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], prepare: Prepare):
        self.paths, self.prepare = paths, prepare

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Path, object, str | None]:
        path = self.paths[index]
        try:
            return path, self.prepare(load_image_rgb(str(path))), None
        except Exception as exc:  # noqa: BLE001 - any decoder error means this one image is unusable
            return path, None, f"cannot be read as an image ({type(exc).__name__}: {exc})"


def image_batches(paths: list[Path], prepare: Prepare, batch_size: int, workers: int | None,
                  summary: RunSummary, desc: str = "images") -> Iterator[list[tuple[Path, object]]]:
    """Batches of ``(path, prepare(rgb array))`` in the order of ``paths``, with a progress bar;
    failures go to ``summary``."""
    dataset = _PreparedImages(paths, prepare)
    if workers:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                             collate_fn=list, shuffle=False)
        chunks = iter(loader)
    else:
        chunks = ([dataset[i] for i in range(start, min(start + batch_size, len(paths)))]
                  for start in range(0, len(paths), batch_size))
    bar = tqdm(total=len(paths), desc=desc, unit="img", smoothing=0.0)
    for chunk in chunks:
        bar.update(len(chunk))
        good = []
        for path, prepared, error in chunk:
            if error:
                summary.fail(path, error)
            else:
                good.append((path, prepared))
        if good:
            yield good
    bar.close()
