"""Prompt files for sample images: kohya's one-line format with ``--n/--w/--h/--d/--l/--s/--ss``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from library.sampling.samplers import canonical_sampler
from library.utils.errors import UserError
from library.utils.files import parse_user_file, read_user_text
from library.utils.ranges import PROMPT_OPTIONS, check


@dataclass(frozen=True)
class SamplePrompt:
    """One image to generate."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    scale: float = 7.5
    steps: int = 30
    sampler: str | None = None


def _option(prompt: SamplePrompt, opt: str, value: str) -> SamplePrompt:
    opt = opt.lower()
    if opt == "n":
        return replace(prompt, negative_prompt=value)
    if opt in PROMPT_OPTIONS:  # out of range is an error here (kohya clamps --s and --w/--h silently)
        check(float(value), PROMPT_OPTIONS[opt], f"--{opt}")
    if opt in ("w", "h"):
        return replace(prompt, **{"width" if opt == "w" else "height": int(value) // 8 * 8})  # kohya rounds down
    if opt == "d":
        return replace(prompt, seed=int(value))
    if opt == "l":
        return replace(prompt, scale=float(value))
    if opt == "s":
        return replace(prompt, steps=int(value))
    if opt == "ss":
        return replace(prompt, sampler=canonical_sampler(value))
    raise KeyError(opt)


def parse_prompt_line(line: str, defaults: SamplePrompt | None = None) -> SamplePrompt:
    """Parse ``text --n negative --w 512 ...``; raises ValueError/KeyError/UserError on bad options."""
    parts = line.split(" --")
    prompt = replace(defaults or SamplePrompt(""), prompt=parts[0].strip())
    for part in parts[1:]:
        opt, _, value = part.strip().partition(" ")
        value = value.strip()
        if not value:
            raise ValueError(f"option --{opt} has no value")
        prompt = _option(prompt, opt, value)
    return prompt


_DICT_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
              "seed": "seed", "scale": "scale", "guidance_scale": "scale", "sample_steps": "steps",
              "sample_sampler": "sampler"}


def _from_dict(d: dict, where: str) -> SamplePrompt:
    unknown = [k for k in d if k not in _DICT_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; known: {sorted(_DICT_KEYS)}")
    kwargs = {_DICT_KEYS[k]: v for k, v in d.items()}
    if "sampler" in kwargs:
        kwargs["sampler"] = canonical_sampler(kwargs["sampler"])
    return SamplePrompt(**kwargs)


def load_prompt_file(path: str) -> list[SamplePrompt]:
    """Read a .txt (one prompt per line, ``#`` comments), .toml or .json prompt file; every line is
    checked now, so a bad option stops the run before any model is loaded."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"sample prompt file not found: {p} (--sample_prompts)")
    if p.suffix.lower() == ".json":
        data = parse_user_file(p, "--sample_prompts", "json")
        return [parse_prompt_line(d) if isinstance(d, str) else _from_dict(d, f"{p} entry {i}")
                for i, d in enumerate(data)]
    if p.suffix.lower() == ".toml":
        data = parse_user_file(p, "--sample_prompts", "toml").get("prompt", {})
        shared = {k: v for k, v in data.items() if k != "subset"}
        return [_from_dict({**shared, **sub}, f"{p} subset {i}") for i, sub in enumerate(data.get("subset", []))]
    prompts = []
    for n, line in enumerate(read_user_text(p, "--sample_prompts").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            prompts.append(parse_prompt_line(line))
        except KeyError as exc:
            raise UserError(f"{p}:{n}: unknown option --{exc.args[0]}; use --n --w --h --d --l --s --ss") from exc
        except ValueError as exc:
            raise UserError(f"{p}:{n}: bad option value ({exc})") from exc
        except UserError as exc:
            raise UserError(f"{p}:{n}: {exc}") from exc
    return prompts
