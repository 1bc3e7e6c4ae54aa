"""``--config_file`` (training flags in TOML) and ``--output_config``, as kohya reads and writes them.

Tables in the file are flattened (their names do not matter). Precedence: a flag given on the
command line beats the file, and the file beats the parser's defaults. Values are coerced the way
the kohya_ss GUI and kohya's own files give them: ``1``/``0`` or ``"true"`` for switches, numbers as
strings, one value or a space-separated string for list flags, ``""`` for "not set". Keys that are
not flags of the script are reported in one warning (kohya passes them along unused); a key that
looks like a misspelt flag is an error, as a misspelt flag on the command line would be.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from pathlib import Path

import toml

from library.utils.errors import UserError
from library.utils.files import parse_user_file

logger = logging.getLogger(__name__)

# never written by --output_config
_NOT_WRITTEN = {"config_file", "output_config", "wandb_api_key", "huggingface_token"}
# never read from a config file
_NOT_READ = {"config_file", "output_config"}

#: keys the kohya_ss GUI or kohya's scripts write that mean nothing to these scripts (the GUI's own
#: bookkeeping, accelerate's settings, Hugging Face upload, memory hints, FLUX's options)
FOREIGN_KEYS = {
    "epoch": "the GUI's epoch count (max_train_epochs is what trains)",
    "noise_offset_type": "the GUI's choice of noise_offset or multires_noise_* (those keys are read)",
    "highvram": "a memory hint (nothing to change here)", "lowvram": "a memory hint (nothing to change here)",
    "disable_mmap_load_safetensors": "a loading option (checkpoints are read without it)",
    "skip_cache_check": "caches are always checked against what they were made from",
    **{key: "Hugging Face upload is not in this version" for key in (
        "huggingface_repo_id", "huggingface_token", "huggingface_repo_type", "huggingface_repo_visibility",
        "huggingface_path_in_repo", "async_upload", "save_state_to_huggingface")},
    **{key: "a FLUX option" for key in (
        "ae", "discrete_flow_shift", "guidance_scale", "model_prediction_type", "timestep_sampling", "split_mode",
        "mem_eff_save", "single_blocks_to_swap", "double_blocks_to_swap")},
}
#: keys kohya acts on that this version cannot honour: refused, since training without them would
#: not be what was asked
NOT_YET = {
    "resume_from_huggingface": "resuming from the Hub",
}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


def _flatten(table: dict, out: dict) -> dict:
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, out)
        else:
            out[key] = value
    return out


def _switch(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{where}: expected true or false (or 1 / 0), got {value!r}")


def _one(action: argparse.Action, value, where: str):
    """One value converted as argparse would convert the same text on the command line."""
    kind = action.type
    if kind in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value) if kind is float else int(value)
            except ValueError:
                raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}") from None
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{where}: expected int, got {value!r}")
            value = int(value)
        if not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
        value = kind(value)
    elif kind is None or kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        value = str(value)
    elif callable(kind):
        try:
            value = kind(str(value))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if action.choices and value not in action.choices:
        raise ValueError(f"{where}: {value!r} is not one of {list(action.choices)}")
    return value


def coerce(action: argparse.Action, value, where: str):
    """A file value for ``action`` as the command line would have given it; ValueError naming the
    key and the value when it cannot be."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return _switch(value, where)
    if isinstance(action, argparse._StoreConstAction):  # a switch for another flag's value (--use_8bit_adam)
        return action.const if _switch(value, where) else None
    if action.nargs in ("*", "+"):
        items = value.split() if isinstance(value, str) else (value if isinstance(value, list) else [value])
        return [_one(action, item, where) for item in items]
    if isinstance(action.nargs, int):
        if not isinstance(value, list) or len(value) != action.nargs:
            raise ValueError(f"{where}: expected a list of {action.nargs} values, got {value!r}")
        return [_one(action, item, where) for item in value]
    return _one(action, value, where)


def _unknown(key: str, actions: dict, where: str, problems: list[str], foreign: list[str]) -> None:
    if key in FOREIGN_KEYS:
        foreign.append(f"{key} ({FOREIGN_KEYS[key]})")
        return
    if key in NOT_YET:
        problems.append(f"{where}: {key}: {NOT_YET[key]} is not available in this version; remove the key")
        return
    hint = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.8)
    if hint:  # one or two letters away from a real flag: a typo, as on the command line
        problems.append(f"{where}: unknown key {key} (did you mean '{hint[0]}'?)")
    else:
        foreign.append(key)


def load_config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Read a ``--config_file`` and check every key against the parser (all problems at once)."""
    p = _toml_path(path)
    if not p.is_file():
        raise UserError(f"--config_file {p}: file not found")
    raw = _flatten(parse_user_file(p, "--config_file", "toml"), {})
    # keys are the flags' names, old spellings included (caption_extention, use_8bit_adam)
    actions = {opt.lstrip("-"): a for a in parser._actions if a.dest != "help" for opt in a.option_strings}
    values, problems, foreign = {}, [], []
    for key, value in raw.items():
        if key in _NOT_READ:
            problems.append(f"{p}: {key} cannot be set in a config file")
        elif key not in actions:
            _unknown(key, actions, str(p), problems, foreign)
        elif value == "":
            continue  # kohya's "not set": the flag keeps its default
        else:
            try:
                coerced = coerce(actions[key], value, f"{p}: {key}")
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if coerced is not None:
                values[actions[key].dest] = coerced
    if problems:
        raise UserError("; ".join(problems))
    if foreign:
        logger.warning("%s: not used by this script: %s", p, ", ".join(foreign))
    return values


def _toml_path(path: str) -> Path:
    return Path(path if path.endswith(".toml") else path + ".toml")


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                           required: tuple[str, ...]) -> argparse.Namespace:
    """Parse ``argv`` with a ``--config_file``'s values as defaults; handle ``--output_config``
    (a path, or kohya's switch: write to the ``--config_file`` path, which is then not read).

    ``required`` flags may come from either place; a missing one is reported here.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file")
    pre.add_argument("--output_config", nargs="?", const=True)
    known, _ = pre.parse_known_args(argv)
    output = known.output_config
    if output is True and not known.config_file:
        raise UserError("--output_config without a path writes to the --config_file path: give --config_file too")
    reads_file = known.config_file and output is not True
    file_values = load_config_defaults(parser, known.config_file) if reads_file else {}
    defaults = {a.dest: parser.get_default(a.dest) for a in parser._actions}  # an alias shares its dest
    parser.set_defaults(**file_values)
    args = parser.parse_args(argv)
    if output:
        target = known.config_file if output is True else output
        write_config(args, defaults, target)
        print(f"wrote {_toml_path(target)}")
        sys.exit(0)
    missing = [f"--{name}" for name in required if getattr(args, name, None) in (None, "")]
    if missing:
        raise UserError(f"{', '.join(missing)} required (on the command line or in --config_file)")
    return args


def write_config(args: argparse.Namespace, defaults: dict, path: str) -> None:
    """Write the flags that differ from the parser defaults as TOML; never overwrite a file."""
    p = _toml_path(path)
    if p.exists():
        raise UserError(f"--output_config {p}: the file exists; choose another name")
    values = {k: v for k, v in vars(args).items()
              if k not in _NOT_WRITTEN and v is not None and v != defaults.get(k)}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(toml.dumps(values), encoding="utf-8")
