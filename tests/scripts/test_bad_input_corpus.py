"""A corpus of bad inputs across the scripts, run as the command line runs them (``run_cli``, in this
process so the whole corpus takes seconds): each ends with exit status 2, one ``error:`` line naming
the culprit, no traceback, and no model loaded (loading is made to fail, so a case that got that far
would show). Classes: missing, empty, truncated, wrong-family and unsafe files; zero, negative and
non-numeric values; unwritable and colliding outputs; odd folders; contradicting flags."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.utils.errors import run_cli
from tests.conftest import tiny_train_args


class _Evil:
    pass


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    made = {"dir": root, "empty": root / "empty.safetensors", "text": root / "notes.txt",
            "truncated": root / "truncated.safetensors", "evil": root / "evil.pt",
            "sdxl_lora": root / "sdxl.safetensors", "a_file": root / "a_file", "empty_dir": root / "empty_dir",
            "lora": root / "lora.safetensors"}
    made["empty"].write_bytes(b"")
    made["text"].write_text("hello", encoding="utf-8")
    save_file({"w": torch.zeros(64, 64)}, str(root / "whole.safetensors"))
    made["truncated"].write_bytes((root / "whole.safetensors").read_bytes()[:-100])
    torch.save({"lora_unet_x.lora_down.weight": _Evil()}, made["evil"])
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(4, 2)}, str(made["sdxl_lora"]))
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2)}, str(made["lora"]))
    made["a_file"].write_text("x", encoding="utf-8")
    for name, data in (("latin1", b"a prompt\nan \xe9t\xe9 prompt\n"), ("bad_json", b'[{"prompt": '),
                       ("bad_toml", b"[general\nx = 1\n")):
        made[name] = root / {"latin1": "latin1.txt", "bad_json": "prompts.json", "bad_toml": "config.toml"}[name]
        made[name].write_bytes(data)
    made["empty_dir"].mkdir()
    return made


def _train(tiny, f, *extra):
    return tiny_train_args(tiny, f["dir"] / "out", "--max_train_steps", "1", *extra)


# (script module, argv builder (tiny default, files) -> argv, text the error line must contain)
CASES = [
    # training: values
    ("train_network", lambda t, f: _train(t, f, "--train_batch_size", "0"), "--train_batch_size 0: must be at least 1"),
    ("train_network", lambda t, f: _train(t, f, "--max_train_steps", "-5"), "--max_train_steps -5: must be at least 1"),
    ("train_network", lambda t, f: _train(t, f, "--learning_rate=-1"), "--learning_rate -1.0: must be at least 0"),
    ("train_network", lambda t, f: _train(t, f, "--network_dim", "four"), "argument --network_dim: invalid int"),
    ("train_network", lambda t, f: _train(t, f, "--caption_dropout_rate", "2"), "--caption_dropout_rate 2.0"),
    ("train_network", lambda t, f: _train(t, f, "--seed=-1"), "--seed -1: must be at least 0"),
    ("train_network", lambda t, f: _train(t, f, "--network_dropout", "1"), "--network_dropout 1.0"),
    ("train_network", lambda t, f: _train(t, f, "--lr_scheduler", "cosin"), "did you mean 'cosine'"),
    ("train_network", lambda t, f: _train(t, f, "--optimizer_type", "Adamm"), "--optimizer_type Adamm: unknown"),
    ("train_network", lambda t, f: _train(t, f, "--network_args", "conv_dim=x"), "conv_dim must be an int"),
    ("train_network", lambda t, f: _train(t, f, "--network_args", "bogus=1"), "unknown key(s) ['bogus']"),
    ("train_network", lambda t, f: _train(t, f, "--network_args", "block_dims=1,2"), "block_dims: 2 values given"),
    # training: files and folders
    ("train_network", lambda t, f: _train(t, f, "--network_weights", str(f["dir"] / "nope.safetensors")),
     "--network_weights"),
    ("train_network", lambda t, f: _train(t, f, "--network_weights", str(f["sdxl_lora"])), "a SDXL LoRA"),
    ("train_network", lambda t, f: _train(t, f, "--network_weights", str(f["truncated"])), "not a readable"),
    ("train_network", lambda t, f: _train(t, f, "--base_weights", str(f["dir"] / "nope.safetensors")),
     "--base_weights"),
    ("train_network", lambda t, f: _train(t, f, "--dim_from_weights"), "--dim_from_weights reads the ranks"),
    ("train_network", lambda t, f: tiny_train_args(t, f["a_file"]), "it is a file, not a folder"),
    ("train_network", lambda t, f: _train(t, f, "--logging_dir", str(f["a_file"] / "logs")), "is a file, so the"),
    ("train_network", lambda t, f: _train(t, f, "--sample_prompts", str(f["dir"] / "nope.txt")),
     "sample prompt file not found"),
    ("train_network", lambda t, f: _train(t, f, "--dataset_config", str(f["text"])), "notes.txt"),
    ("train_network", lambda t, f: [a if a != str(t / "dataset.toml") else str(f["dir"] / "none.toml")
                                    for a in _train(t, f)], "none.toml"),
    ("train_network", lambda t, f: ["--pretrained_model_name_or_path", str(f["empty"]), "--dataset_config",
                                    str(t / "dataset.toml"), "--output_dir", str(f["dir"] / "o")], "empty.safetensors"),
    ("train_network", lambda t, f: _train(t, f, "--train_data_dir", str(f["empty_dir"]), "--dataset_config", ""),
     "empty_dir"),
    ("train_network", lambda t, f: _train(t, f, "--resume", str(f["empty_dir"])), "incomplete state folder"),
    ("train_network", lambda t, f: _train(t, f, "--resume", str(f["dir"] / "gone")), "not a folder"),
    ("train_network", lambda t, f: _train(t, f, "--config_file", str(f["dir"] / "gone.toml")), "gone.toml"),
    # training: contradictions
    ("train_network", lambda t, f: _train(t, f, "--network_train_unet_only", "--network_train_text_encoder_only"),
     "exclude each other"),
    ("train_network", lambda t, f: _train(t, f, "--cache_text_encoder_outputs"), "needs --network_train_unet_only"),
    ("train_network", lambda t, f: _train(t, f, "--skip_until_initial_step"), "needs --initial_step"),
    ("train_network", lambda t, f: _train(t, f, "--sample_prompts", str(f["latin1"])),
     "latin1.txt: not UTF-8 text (line 2"),
    ("train_network", lambda t, f: _train(t, f, "--sample_prompts", str(f["bad_json"])), "cannot parse as JSON"),
    ("train_network", lambda t, f: _train(t, f, "--config_file", str(f["bad_toml"])), "config.toml: cannot parse"),
    ("sdxl_train_network", lambda t, f: _train(t, f), "is not an SDXL checkpoint"),
    ("sd3_train_network", lambda t, f: _train(t, f), "is not an SD3 checkpoint"),
    # generation
    ("gen_img", lambda t, f: ["--ckpt", str(t / "model" / "tiny-sd15.safetensors"), "--outdir", str(f["a_file"]),
                              "--prompt", "a"], "--outdir"),
    ("gen_img", lambda t, f: ["--ckpt", str(t / "model" / "tiny-sd15.safetensors"), "--outdir", str(f["dir"] / "g"),
                              "--prompt", "a", "--steps", "0"], "--steps 0: must be at least 1"),
    ("gen_img", lambda t, f: ["--ckpt", str(t / "model" / "tiny-sd15.safetensors"), "--outdir", str(f["dir"] / "g"),
                              "--prompt", "a", "--network_weights", str(f["dir"] / "nope.safetensors")],
     "--network_weights"),
    ("gen_img", lambda t, f: ["--ckpt", str(t / "model" / "tiny-sd15.safetensors"), "--outdir", str(f["dir"] / "g"),
                              "--prompt", "a", "--W", "100"], "--W 100"),
    ("gen_img", lambda t, f: ["--ckpt", str(t / "model" / "tiny-sd15.safetensors"), "--outdir", str(f["dir"] / "g"),
                              "--from_file", str(f["latin1"])], "latin1.txt: not UTF-8 text (line 2, column 4)"),
    # file tools
    ("networks.merge_lora", lambda t, f: ["--models", str(f["evil"]), "--save_to", str(f["dir"] / "m.safetensors")],
     "could run code"),
    ("networks.merge_lora", lambda t, f: ["--models", str(f["lora"]), str(f["sdxl_lora"]), "--save_to",
                                          str(f["dir"] / "m.safetensors")], "different model families"),
    ("networks.merge_lora", lambda t, f: ["--models", str(f["lora"]), "--sd_model",
                                          str(t / "model" / "tiny-sd15.safetensors"), "--save_to",
                                          str(f["dir"] / "m.safetensors")], "its tensors do not fit"),
    ("networks.merge_lora", lambda t, f: ["--models", str(f["lora"]), "--save_to", str(f["lora"])],
     "is one of the inputs"),
    ("networks.merge_lora", lambda t, f: ["--models", str(f["lora"]), "--ratios", "1", "2", "--save_to",
                                          str(f["dir"] / "m.safetensors")], "--ratios: 2 values for 1"),
    ("networks.resize_lora", lambda t, f: ["--model", str(f["lora"]), "--save_to", str(f["dir"] / "r.safetensors"),
                                           "--new_rank", "8"], "--new_rank 8 is above the file's rank 2"),
    ("networks.resize_lora", lambda t, f: ["--model", str(f["truncated"]), "--save_to",
                                           str(f["dir"] / "r.safetensors"), "--new_rank", "1"],
     "truncated.safetensors"),
    ("networks.svd_merge_lora", lambda t, f: ["--models", str(f["lora"]), "--new_rank", "0", "--save_to",
                                              str(f["dir"] / "s.safetensors")], "--new_rank / --new_conv_rank"),
    ("networks.extract_lora_from_models", lambda t, f: ["--model_org", str(f["text"]), "--model_tuned", str(f["text"]),
                                                        "--save_to", str(f["dir"] / "e.safetensors")], "notes.txt"),
    ("networks.convert_lora", lambda t, f: ["--model", str(f["sdxl_lora"]), "--sd_model",
                                            str(t / "model" / "tiny-sd15.safetensors"), "--save_to",
                                            str(f["dir"] / "c.safetensors")], "an SDXL LoRA, --sd_model an SD1.x"),
    ("networks.check_lora_weights", lambda t, f: [str(f["empty"])], "empty.safetensors"),
    ("networks.extract_lora_from_dylora", lambda t, f: ["--model", str(f["lora"]), "--save_to",
                                                        str(f["dir"] / "d.safetensors"), "--unit", "4"],
     "--unit 4: the file's rank is 2"),
    ("tools.show_metadata", lambda t, f: ["--model", str(f["text"])], "only .safetensors files carry metadata"),
    ("tools.merge_models", lambda t, f: ["--models", str(t / "model" / "tiny-sd15.safetensors"), "--output",
                                         str(f["dir"] / "mm.safetensors")], "give two or more checkpoints"),
    ("tools.convert_diffusers20_original_sd", lambda t, f: [str(f["dir"] / "gone.safetensors"), str(f["dir"] / "x")],
     "file or folder not found"),
    ("tools.cache_latents", lambda t, f: ["--pretrained_model_name_or_path", str(t / "model" / "tiny-sd15.safetensors"),
                                          "--dataset_config", str(t / "dataset.toml"), "--color_aug"],
     "with color_aug"),
]


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch):
    from library.families.sd import SDFamily
    from library.models import checkpoints

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    real = checkpoints.load_sd_single_file

    def skeleton_only(*args, **kwargs):  # a skeleton from the header reads no weight
        return real(*args, **kwargs) if kwargs.get("device") == "meta" else refuse()

    monkeypatch.setattr(SDFamily, "load", refuse)
    monkeypatch.setattr(checkpoints, "load_sd_single_file", skeleton_only)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input(index, tiny_default, files, capsys):
    script, argv, expected = CASES[index]
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, argv(tiny_default, files))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    assert expected in err, err[-2000:]


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) >= 12
