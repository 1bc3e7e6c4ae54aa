"""The layers import only downwards.

Every module of the project (entry scripts, library/, networks/, tools/, finetune/) is read with ``ast``
and each import of a project module, at module level or inside a function, is checked against
:data:`LAYERS`: a module may import its own folder and the layers below its own, never a layer above
nor a different folder of its own layer. A failure names the importing file, its line and the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: bottom to top; folders on one line form one layer and do not import each other
LAYERS: list[tuple[str, ...]] = [
    ("library.utils",),  # errors, atomic files, logging setup
    ("library.maths",),  # pure maths: noise, loss, flow matching, timesteps, rng, precision, metadata
    ("library.models",),  # checkpoint I/O for every layout, tiny models, block swap
    ("library.sampling", "networks"),  # samplers, prompt weighting, the typed pipeline call; network plug-ins
    ("library.families",),  # SD1/SD2, SDXL, SD3
    ("library.data", "library.optim"),  # datasets and caches; optimizer and scheduler registries
    ("library.prep",),  # dataset preparation for finetune/: taggers, captioners, metadata files
    ("library.config",),  # the typed training config and family options built from the flags
    ("library.training",),  # the trainer and what it saves and restores
    ("library.generation",),  # the gen_img application
    ("library.args",),  # argparse groups for the entry scripts
    ("scripts", "tools", "finetune"),  # entry scripts
]
PROJECT_ROOTS = ("library", "networks", "tools", "finetune")


def _folder(module: str, entry_scripts: set[str]) -> str:
    parts = module.split(".")
    if module in entry_scripts:
        return "scripts"
    if parts[0] == "library":
        return ".".join(parts[:2])
    if parts[0] in PROJECT_ROOTS:
        return parts[0]
    raise KeyError(module)


def _entry_scripts(modules: dict[str, Path]) -> set[str]:
    """Top-level scripts, and the tools kohya keeps in networks/ (merge_lora.py, ...) where its users
    run them from: modules there with a ``__main__`` block are entry scripts of the top layer."""
    top = {m for m in modules if "." not in m and m not in PROJECT_ROOTS}
    tools = {m for m, p in modules.items() if m.startswith("networks.")
             and '__name__ == "__main__"' in p.read_text(encoding="utf-8")}
    return top | tools


def _rank() -> dict[str, int]:
    return {folder: i for i, layer in enumerate(LAYERS) for folder in layer}


def _project_modules() -> dict[str, Path]:
    modules = {p.stem: p for p in ROOT.glob("*.py") if p.name != "setup.py"}
    for root in PROJECT_ROOTS:
        for p in (ROOT / root).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = p
    modules.pop("library", None)  # the empty top package
    return modules


def _imports(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = module.split(".")[:-node.level]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def upward_imports(modules: dict[str, Path] | None = None) -> list[str]:
    """Every import that goes up a layer or sideways into another folder of the same layer."""
    modules = modules or _project_modules()
    scripts = _entry_scripts(modules)
    rank = _rank()
    problems = []
    for module, path in sorted(modules.items()):
        source = _folder(module, scripts)
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        assert source in rank, f"{where}: its folder {source} is in no layer of LAYERS"
        for line, target in _imports(ast.parse(path.read_text(encoding="utf-8")), module):
            top = target.split(".")[0]
            if top not in PROJECT_ROOTS and target not in scripts:
                continue  # a third-party or standard module
            folder = _folder(target, scripts)
            if folder == source:
                continue
            if rank[folder] >= rank[source]:
                problems.append(f"{where}:{line} imports {target} ({folder}, layer {rank[folder]}) "
                                f"from layer {rank[source]} ({source})")
    return problems


def test_imports_only_go_down():
    problems = upward_imports()
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_check_catches_upward_and_sideways_imports(tmp_path):
    """The checker itself: a model-I/O module importing the trainer inside a function, and a network
    plug-in importing the sampling layer beside it, are reported with file and line."""
    up = tmp_path / "up_probe.py"
    up.write_text("import torch\n\n\ndef f():\n    from library.training.trainer import NetworkTrainer\n")
    side = tmp_path / "side_probe.py"
    side.write_text("from library.sampling.samplers import build_scheduler\n")
    modules = {**_project_modules(), "library.models.up_probe": up, "networks.side_probe": side}
    problems = upward_imports(modules)
    assert any(p.startswith("up_probe.py:5 imports library.training.trainer") for p in problems), problems
    assert any(p.startswith("side_probe.py:1 imports library.sampling.samplers") for p in problems), problems
    assert len(problems) == 2
