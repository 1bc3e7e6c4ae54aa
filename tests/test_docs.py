"""docs/architecture.md stays true to the code: the family methods it tells a new family to write are
the contract's abstract methods, the plug-in methods it calls required are the adapter's, its layer
table names every layer folder, and every project path it mentions exists."""

from __future__ import annotations

import re
from pathlib import Path

from library.families.base import ModelFamily
from networks.base import REQUIRED
from tests.test_layers import LAYERS

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    return DOC.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_the_family_steps_name_the_abstract_methods():
    step = _section("Adding a model family").split("implementing the abstract methods", 1)[1].split("and overriding")[0]
    named = set(re.findall(r"`(\w+)(?:\(\w*\))?`", step))
    assert named == set(ModelFamily.__abstractmethods__)


def test_the_plugin_section_names_the_required_methods():
    text = _section("Adding a network plug-in").split("The network object needs", 1)[1].split("to train;")[0]
    assert set(re.findall(r"`(\w+)`", text)) == set(REQUIRED["train"])


def test_the_layer_table_names_every_layer_folder():
    table = _section("Layers")
    for layer in LAYERS:
        for folder in layer:
            if folder.startswith("library.") or folder == "networks":
                assert f"`{folder.replace('.', '/')}/`" in table, folder


def test_every_path_it_mentions_exists():
    paths = set(re.findall(r"`((?:library|networks|tests|tools)/[\w/]+(?:\.py)?)`", DOC))
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()]
    assert not missing
