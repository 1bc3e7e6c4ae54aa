"""Where gen_img.py's prompts come from: ``--prompt``, ``--from_file``, ``--interactive`` (lines
typed on standard input) or ``--from_module`` (a Python file with kohya's ``get_prompter``).

Interactive and module prompts are generated as they arrive, a line (interactive) or an iteration
(module) at a time.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from library.generation.config import GenConfig
from library.generation.prompt_lines import GenPrompt, parse_gen_line
from library.utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class PromptChunk:
    """Prompts that arrived together, the problems found in their lines, and their iteration."""

    prompts: list[GenPrompt]
    problems: list[str]
    iteration: int = 0


def interactive_chunks(read: Callable[[], str] = input) -> Iterator[PromptChunk]:
    """One chunk per typed line until end of input; empty lines are asked again."""
    number = 0
    while True:
        print("Type a prompt (with --n, --w, ... options; end with Ctrl-D):", file=sys.stderr, flush=True)
        try:
            line = read().strip()
        except EOFError:
            return
        if not line:
            continue
        number += 1
        source = f"interactive prompt {number}"
        try:
            yield PromptChunk([parse_gen_line(line, source, number - 1)], [])
        except UserError as exc:
            yield PromptChunk([], [str(exc)])


@dataclass
class GenerationContext:
    """What ``--from_module`` prompters get in place of kohya's pipeline object."""

    family: object  # the ModelFamily
    models: object  # LoadedModels: denoiser, vae, text_encoders, tokenizers
    device: object


def load_prompter(config: GenConfig, context: GenerationContext, networks: list):
    """kohya's protocol: the file defines ``get_prompter(args, pipe, networks)`` returning a callable
    that is called as ``prompter(args, pipe, seed_random, iter_seed, prompt_index, global_step)``
    and returns a prompt line, or None at the end of each iteration. ``args`` is the command line
    (``config.prompter_args``), handed to the user's module as kohya does and read by nothing here."""
    path = Path(config.prompts.from_module)
    if not path.is_file():
        raise UserError(f"--from_module {path}: file not found")
    spec = importlib.util.spec_from_file_location("gen_img_prompt_module", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: report what failed in it
        raise UserError(f"--from_module {path}: the module failed to load ({type(exc).__name__}: {exc})") from exc
    if not callable(getattr(module, "get_prompter", None)):
        raise UserError(f"--from_module {path}: the module has no get_prompter(args, pipe, networks) function")
    return module.get_prompter(config.prompter_args, context, [loaded.network.net for loaded in networks])


def module_chunks(config: GenConfig, prompter, context: GenerationContext, seed: int) -> Iterator[PromptChunk]:
    """One chunk per iteration (``--n_iter``): the prompter's lines until it returns None."""
    seed_random = random.Random(seed)
    step, args = 0, config.prompter_args
    for iteration in range(config.prompts.n_iter):
        prompts, problems, index = [], [], 0
        while (line := prompter(args, context, seed_random, seed + iteration, index, step)) is not None:
            source = f"{config.prompts.from_module} iteration {iteration + 1} prompt {index + 1}"
            try:
                prompts.append(parse_gen_line(str(line), source, index))
            except UserError as exc:
                problems.append(str(exc))
            index += 1
            step += 1
        yield PromptChunk(prompts, problems, iteration)
