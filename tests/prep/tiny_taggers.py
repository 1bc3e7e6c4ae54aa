"""Tiny ONNX taggers whose every output is known from the input image, built with onnx's helper API.

Output ``t`` is ``weight_t * mean(channel c_t of the model's input) + bias_t`` (through a sigmoid in
the logits layout), so for a solid-colour image the expected probability of every tag can be worked
out by hand from its colour, the channel order and the value range of the layout.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


def tagger_graph(path: Path, outputs: list[tuple[int, float, float]], size: int, layout: str = "NHWC",
                 batch: int | str = "batch") -> None:
    """``outputs``: (input channel, weight, bias) per tag; ``batch`` an int for a fixed batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = [batch, size, size, 3] if layout == "NHWC" else [batch, 3, size, size]
    axes = [1, 2] if layout == "NHWC" else [2, 3]
    weight = np.zeros((3, len(outputs)), dtype=np.float32)
    bias = np.zeros(len(outputs), dtype=np.float32)
    for t, (channel, w, b) in enumerate(outputs):
        weight[channel, t], bias[t] = w, b
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1"], ["means"], axes=axes, keepdims=0),
         helper.make_node("MatMul", ["means", "W"], ["mixed"]),
         helper.make_node("Add", ["mixed", "b"], ["predictions"])],
        "tiny_tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, [batch, len(outputs)])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def wd_folder(folder: Path, tags: list[tuple[str, str, int, float, float]], size: int = 32,
              layout: str = "NHWC", batch: int | str = "batch") -> Path:
    """A WD-layout folder: model.onnx + selected_tags.csv. ``tags``: (name, Danbooru category
    number, channel, weight, bias) in output order."""
    tagger_graph(folder / "model.onnx", [(c, w, b) for _, _, c, w, b in tags], size, layout, batch)
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, *_rest) in enumerate(tags):
            writer.writerow([1000 + i, name, category, 10])
    return folder


def mapping_folder(folder: Path, tags: list[tuple[str, str, int, float, float]], size: int = 32) -> Path:
    """A tag_mapping.json folder (NCHW, [-1, 1] input, logits out): (name, category name, ...)."""
    tagger_graph(folder / "model.onnx", [(c, w, b) for _, _, c, w, b in tags], size, "NCHW")
    mapping = {"idx_to_tag": {str(i): t[0] for i, t in enumerate(tags)},
               "tag_to_category": {t[0]: t[1] for t in tags}}
    (folder / "tag_mapping.json").write_text(json.dumps(mapping), encoding="utf-8")
    return folder


def solid(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path
