"""gen_img.py's prompt lines: kohya's per-line options and the seeds' ``positive|||negative`` files.

Prompts may hold dynamic choices ``{red|blue} {circle|{square|star}}`` (see dynamic_prompts.py).
A line is ``text --n negative --w 512 --h 768 --d 1,2 --l 7 --s 30 --ss euler_a --t 0.6 --nl 2
--am 0.8,1 --f name`` (options case-insensitive, in any order; also Deep Shrink's ``--dsd1 --dst1
--dsd2 --dst2 --dsr`` and Gradual Latent's ``--glt --glr --gle --gls --glsn --glus``), or
``positive|||negative``. ``--d``
gives one seed per image of that line. Each line is parsed on its own, so one bad line is reported
with its file and line number and the others still generate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from library.sampling.gradual_latent import Unsharp
from library.sampling.samplers import canonical_sampler
from library.utils.errors import UserError
from library.utils.files import read_user_text
from library.utils.ranges import PROMPT_OPTIONS, check

NO_NEGATIVE_SCALE = -1.0
# Deep Shrink and Gradual Latent line options -> (field of DeepShrink / GradualLatent, parser)
DEEP_SHRINK_OPTIONS = {"dsd1": ("depth_1", int), "dst1": ("timesteps_1", int), "dsd2": ("depth_2", int),
                       "dst2": ("timesteps_2", int), "dsr": ("ratio", float)}
GRADUAL_LATENT_OPTIONS = {"glt": ("start_timesteps", float), "glr": ("ratio", float), "gle": ("every_n_steps", int),
                          "gls": ("ratio_step", float), "glsn": ("s_noise", float),
                          "glus": ("unsharp", Unsharp.parse)}
OPTIONS = ("n", "w", "h", "d", "l", "s", "ss", "t", "nl", "am", "f", "ow", "oh", "nw", "nh", "ct", "cl", "c",
           *DEEP_SHRINK_OPTIONS, *GRADUAL_LATENT_OPTIONS)


@dataclass(frozen=True)
class GenPrompt:
    """One prompt line with everything it sets; ``None`` fields fall back to the command line."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seeds: tuple[int, ...] = ()
    scale: float | None = None
    negative_scale: float | None = None  # NO_NEGATIVE_SCALE: "--nl none", the command line's is not used
    steps: int | None = None
    sampler: str | None = None
    strength: float | None = None
    network_muls: tuple[float, ...] | None = None
    file_name: str | None = None
    original_size: tuple[int | None, int | None] = (None, None)  # SDXL (width, height)
    negative_original_size: tuple[int | None, int | None] = (None, None)  # SDXL --nw/--nh
    crop: tuple[int, int] = (0, 0)  # SDXL (top, left)
    clip_prompt: str | None = None  # kohya's --c: recorded in the PNG, not used by the pipelines
    # the line's Deep Shrink / Gradual Latent settings ((field, value) pairs); any turns it on for the line
    deep_shrink: tuple[tuple[str, object], ...] = ()
    gradual_latent: tuple[tuple[str, object], ...] = ()
    source: str = ""  # "file:line" for messages
    split_style: bool = False  # came from a positive|||negative line (the seeds' file naming)
    index: int = 0  # place in the prompt list


def _size(value: str) -> int:
    size = int(value)
    if size < 64 or size % 8:
        raise ValueError(f"{size} is not a multiple of 8 of at least 64")
    return size


def _floats(value: str) -> tuple[float, ...]:
    return tuple(float(v) for v in value.split(","))


def _apply(p: GenPrompt, opt: str, value: str) -> GenPrompt:
    simple = {"n": ("negative_prompt", str), "w": ("width", _size), "h": ("height", _size),
              "l": ("scale", float), "s": ("steps", int), "ss": ("sampler", canonical_sampler),
              "t": ("strength", float), "f": ("file_name", str), "c": ("clip_prompt", str)}
    if opt in simple:
        name, convert = simple[opt]
        return replace(p, **{name: convert(value)})
    if opt == "d":
        return replace(p, seeds=tuple(int(v) for v in value.split(",")))
    if opt == "nl":
        return replace(p, negative_scale=NO_NEGATIVE_SCALE if value.lower() == "none" else float(value))
    if opt == "am":
        return replace(p, network_muls=_floats(value))
    if opt in ("ow", "oh"):
        w, h = p.original_size
        return replace(p, original_size=(int(value), h) if opt == "ow" else (w, int(value)))
    if opt in ("ct", "cl"):
        top, left = p.crop
        return replace(p, crop=(int(value), left) if opt == "ct" else (top, int(value)))
    if opt in ("nw", "nh"):
        w, h = p.negative_original_size
        return replace(p, negative_original_size=(int(value), h) if opt == "nw" else (w, int(value)))
    if opt in DEEP_SHRINK_OPTIONS:
        name, convert = DEEP_SHRINK_OPTIONS[opt]
        return replace(p, deep_shrink=(*p.deep_shrink, (name, convert(value))))
    if opt in GRADUAL_LATENT_OPTIONS:
        name, convert = GRADUAL_LATENT_OPTIONS[opt]
        return replace(p, gradual_latent=(*p.gradual_latent, (name, convert(value))))
    raise KeyError(opt)


def parse_gen_line(line: str, source: str = "", index: int = 0) -> GenPrompt:
    """Parse one line; raises UserError naming ``source`` for an unknown option or a bad value."""
    if "|||" in line:
        positive, _, negative = line.partition("|||")
        return GenPrompt(positive.strip(), negative.strip(), source=source, split_style=True, index=index)
    parts = line.split(" --")
    prompt = GenPrompt(parts[0].strip(), source=source, index=index)
    for part in parts[1:]:
        opt, _, value = part.strip().partition(" ")
        opt, value = opt.lower(), value.strip()
        if opt not in OPTIONS:
            raise UserError(f"{source}: unknown option --{opt} (known: {', '.join('--' + o for o in OPTIONS)})")
        if not value:
            raise UserError(f"{source}: option --{opt} has no value")
        if opt in PROMPT_OPTIONS:
            for number in value.split(","):  # --d takes a list of seeds
                try:
                    check(float(number), PROMPT_OPTIONS[opt], f"{source}: --{opt}")
                except ValueError:
                    raise UserError(f"{source}: bad value for --{opt}: {number!r} is not a number") from None
        try:
            prompt = _apply(prompt, opt, value)
        except (ValueError, UserError) as exc:
            raise UserError(f"{source}: bad value for --{opt}: {exc}") from exc
    if not prompt.prompt:
        raise UserError(f"{source}: the line has options but no prompt")
    return prompt


def read_prompt_file(path: str) -> tuple[list[GenPrompt], list[str]]:
    """(prompts, problems): every line that parses, and one message per line that does not."""
    p = Path(path)
    prompts, problems = [], []
    for n, raw in enumerate(read_user_text(p, "--from_file").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            prompts.append(parse_gen_line(line, f"{p}:{n}", len(prompts)))
        except UserError as exc:
            problems.append(str(exc))
    return prompts, problems
