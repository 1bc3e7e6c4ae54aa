"""``--config_file`` (training flags in TOML) and ``--output_config``, as kohya defines them.

Tables in the file are flattened (their names do not matter). Precedence: a flag given on the
command line beats the file, and the file beats the parser's defaults.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import toml

from library.utils.errors import UserError

# never written by --output_config, and never read from a config file
_SKIP = {"config_file", "output_config", "wandb_api_key", "huggingface_token"}


def _flatten(table: dict, out: dict) -> dict:
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, out)
        else:
            out[key] = value
    return out


def _check_value(action: argparse.Action, value, path: str) -> str | None:
    """A problem with one file value for ``action``, or None."""
    flag = f"{path}: {action.dest}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return None if isinstance(value, bool) else f"{flag}: expected true or false, got {value!r}"
    if action.nargs in ("*", "+"):
        return None if isinstance(value, (list, str, int, float)) else f"{flag}: expected a list, got {value!r}"
    if action.type in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or (action.type is int and not isinstance(value, int))):
        return f"{flag}: expected {action.type.__name__}, got {value!r}"
    if action.choices and value not in action.choices:
        return f"{flag}: {value!r} is not one of {list(action.choices)}"
    return None


def load_config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Read a ``--config_file`` and check every key against the parser (all problems at once)."""
    p = Path(path if path.endswith(".toml") else path + ".toml")
    if not p.is_file():
        raise UserError(f"--config_file {p}: file not found")
    try:
        values = _flatten(toml.loads(p.read_text(encoding="utf-8")), {})
    except toml.TomlDecodeError as exc:
        raise UserError(f"--config_file {p}: cannot parse: {exc}") from exc
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help",)}
    problems = []
    for key, value in values.items():
        if key in _SKIP:
            problems.append(f"{p}: {key} cannot be set in a config file")
        elif key not in actions:
            hint = difflib.get_close_matches(key, list(actions), n=1)
            problems.append(f"{p}: unknown key {key}" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        elif (problem := _check_value(actions[key], value, str(p))) is not None:
            problems.append(problem)
        elif actions[key].nargs in ("*", "+") and not isinstance(value, list):
            values[key] = [value]  # kohya configs give one-value lists as a plain value
    if problems:
        raise UserError("; ".join(problems))
    return values


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                           required: tuple[str, ...]) -> argparse.Namespace:
    """Parse ``argv`` with a ``--config_file``'s values as defaults; handle ``--output_config``.

    ``required`` flags may come from either place; a missing one is reported here.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file")
    known, _ = pre.parse_known_args(argv)
    file_values = load_config_defaults(parser, known.config_file) if known.config_file else {}
    defaults = {a.dest: a.default for a in parser._actions}
    parser.set_defaults(**file_values)
    args = parser.parse_args(argv)
    if getattr(args, "output_config", None):
        write_config(args, defaults, args.output_config)
        print(f"wrote {args.output_config}")
        sys.exit(0)
    missing = [f"--{name}" for name in required if getattr(args, name, None) in (None, "")]
    if missing:
        raise UserError(f"{', '.join(missing)} required (on the command line or in --config_file)")
    return args


def write_config(args: argparse.Namespace, defaults: dict, path: str) -> None:
    """Write the flags that differ from the parser defaults as TOML; never overwrite a file."""
    p = Path(path if path.endswith(".toml") else path + ".toml")
    if p.exists():
        raise UserError(f"--output_config {p}: the file exists; choose another name")
    values = {k: v for k, v in vars(args).items()
              if k not in _SKIP and v is not None and v != defaults.get(k)}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(toml.dumps(values), encoding="utf-8")
