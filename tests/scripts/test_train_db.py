"""train_db.py and fine_tune.py: the model's own weights trained on the one trainer. The saved
single file opens in diffusers' from_single_file with every tensor as trained, the text encoder
stops changing at --stop_text_encoder_training, frozen parts keep their bytes, a resumed run ends
bit-identical, fine_tune.py trains from a metadata JSON into a diffusers folder, and bad input is
refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.utils.errors import run_cli
from tests.conftest import part, run_script, same_tensors

TE, UNET, VAE = "cond_stage_model.", "model.diffusion_model.", "first_stage_model."


def _db_args(tiny_default: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny_default / "model" / "tiny-sd15.safetensors"),
            "--dataset_config", str(tiny_default / "dataset.toml"), "--output_dir", str(out), "--seed", "3",
            "--max_train_steps", "4", "--learning_rate", "1e-3", "--console_log_level", "WARNING", *extra]




@pytest.fixture(scope="module")
def dreambooth(tiny_default, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("db")
    run_script("train_db.py", *_db_args(tiny_default, out, "--stop_text_encoder_training", "2", "--no_token_padding",
                                        "--save_every_n_steps", "2", "--save_state", "--sample_prompts",
                                        str(tiny_default / "prompts.txt"), "--sample_every_n_steps", "4"), check=True)
    return out


def test_dreambooth_trains_the_model_and_stops_the_text_encoder(tiny_default, dreambooth, tmp_path):
    base = load_file(str(tiny_default / "model" / "tiny-sd15.safetensors"))
    mid = load_file(str(dreambooth / "last-step00000002.safetensors"))
    final = load_file(str(dreambooth / "last.safetensors"))
    assert final.keys() == base.keys()
    assert not same_tensors(part(mid, TE), part(base, TE))  # the text encoder trained in steps 1-2 ...
    assert same_tensors(part(mid, TE), part(final, TE))  # ... and not after --stop_text_encoder_training 2
    assert not same_tensors(part(mid, UNET), part(final, UNET))  # the UNet kept training
    assert same_tensors(part(final, VAE), part(base, VAE))  # the VAE never trains
    assert len(list((dreambooth / "sample").glob("*.png"))) == 2
    with safe_open(str(dreambooth / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_training_kind"] == "dreambooth" and meta["ss_steps"] == "4" and len(meta["sshs_model_hash"]) == 64
    # diffusers' own single-file reader sees exactly the trained UNet
    from diffusers import UNet2DConditionModel

    from library.models.sd_loading import load_sd_single_file

    ours = load_sd_single_file(str(dreambooth / "last.safetensors"), with_tokenizer=False)
    ours.unet.save_config(str(tmp_path / "cfg"))
    theirs = UNet2DConditionModel.from_single_file(str(dreambooth / "last.safetensors"), config=str(tmp_path / "cfg"))
    mine = ours.unet.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in theirs.state_dict().items())
    # and gen_img generates with it
    run_script("gen_img.py", "--ckpt", str(dreambooth / "last.safetensors"), "--tokenizer_cache_dir",
               str(tiny_default / "model"), "--outdir", str(tmp_path / "gen"), "--prompt", "sks shape", "--W", "64",
               "--H", "64", "--steps", "2", check=True)
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1


def test_dreambooth_resumes_bit_identically(tiny_default, dreambooth, tmp_path):
    out = tmp_path / "resumed"
    run_script("train_db.py", *_db_args(tiny_default, out, "--stop_text_encoder_training", "2", "--no_token_padding",
                                        "--resume",
                                        str(dreambooth / "last-step00000002-state")), check=True)
    assert same_tensors(load_file(str(out / "last.safetensors")), load_file(str(dreambooth / "last.safetensors")))


def _metadata(tiny_default: Path, path: Path) -> Path:
    """kohya's finetune/ metadata for the tiny default's training images: keys relative to the folder
    (the stem, as the finetune/ scripts write them) and, for half of them, absolute (--full_path)."""
    folder = next((tiny_default / "train").iterdir())
    images = sorted(folder.glob("*.png"))
    meta = {(str(p) if i % 2 else p.stem): {"caption": "sks shape", "tags": "red, circle"}
            for i, p in enumerate(images)}
    path.write_text(json.dumps(meta), encoding="utf-8")
    return folder


def test_fine_tune_from_metadata_into_a_diffusers_folder(tiny_default, tmp_path):
    folder = _metadata(tiny_default, tmp_path / "meta.json")
    out = tmp_path / "ft"
    run_script("fine_tune.py", "--pretrained_model_name_or_path", str(tiny_default / "model" / "tiny-sd15.safetensors"),
               "--in_json", str(tmp_path / "meta.json"), "--train_data_dir", str(folder), "--resolution", "64",
               "--train_batch_size", "2", "--output_dir", str(out), "--max_train_steps", "2", "--learning_rate",
               "1e-3", "--save_model_as", "diffusers_safetensors", "--console_log_level", "WARNING", check=True)
    from diffusers import StableDiffusionPipeline

    from library.models.sd_loading import load_sd_model, load_sd_single_file

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "last"), safety_checker=None)
    base = load_sd_single_file(str(tiny_default / "model" / "tiny-sd15.safetensors"), with_tokenizer=False)
    ours = load_sd_model(str(out / "last"))
    assert same_tensors(pipe.text_encoder.state_dict(), base.text_encoder.state_dict())  # no --train_text_encoder
    assert same_tensors(pipe.unet.state_dict(), ours.unet.state_dict())
    assert not same_tensors(pipe.unet.state_dict(), base.unet.state_dict())


def test_fused_backward_pass_equals_the_plain_adafactor_step(tiny_default, tmp_path):
    """--fused_backward_pass steps each tensor inside backward; without gradient clipping that is
    the same Adafactor update as the plain step (to float rounding: the same kernels, in another
    order across tensors, on a 3-step run of a tiny model)."""
    adafactor = ["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
                 "warmup_init=False", "--max_grad_norm", "0", "--max_train_steps", "3"]
    for name, extra in (("plain", []), ("fused", ["--fused_backward_pass"])):
        run_script("train_db.py", *_db_args(tiny_default, tmp_path / name, *adafactor, *extra), check=True)
    plain = load_file(str(tmp_path / "plain" / "last.safetensors"))
    fused = load_file(str(tmp_path / "fused" / "last.safetensors"))
    base = load_file(str(tiny_default / "model" / "tiny-sd15.safetensors"))
    assert not same_tensors(part(plain, UNET), part(base, UNET))
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_prior_loss_weight_weighs_the_regularisation_images(tiny_default):
    from library.args.model_training import model_training_parser
    from library.config.family_options import training_family
    from library.config.training_config import build_training_config
    from library.training.model_weights import ModelTraining
    from library.training.trainer import Trainer

    args = model_training_parser("t", "dreambooth").parse_args(
        _db_args(tiny_default, tiny_default / "unused", "--prior_loss_weight", "0.3"))
    config = build_training_config(args, "dreambooth")
    group = Trainer(training_family("sd", args, config.datasets), config, ModelTraining(config.model)).prepare_data()
    weights = {}
    for index in range(len(group)):
        batch = group[(0, index)]
        for path, weight in zip(batch.paths, batch.loss_weights.tolist()):
            weights[Path(path).parent.name] = weight
    assert weights == {"10_sks shape": 1.0, "1_shape": pytest.approx(0.3)}


@pytest.mark.parametrize("script, extra, message", [
    ("train_db", ["--in_json", "meta.json", "--dataset_config", "", "--resolution", "64"],
     "--in_json: fine-tuning metadata"),
    ("fine_tune", [], "no metadata_file; fine_tune.py trains from captions"),
    ("train_db", ["--cache_text_encoder_outputs"], "the text encoder is trained in this run"),
    ("train_db", ["--no_token_padding", "--max_token_length", "150"], "--no_token_padding pads each batch"),
    ("train_db", ["--fp8_base", "--mixed_precision", "bf16"], "cannot be fp8"),
    ("train_db", ["--stop_text_encoder_training", "-2"], "--stop_text_encoder_training -2: must be at least -1"),
    ("train_db", ["--save_model_as", "pt"], "invalid choice: 'pt'"),
    ("train_db", ["--network_module", "networks.lora"], "unrecognized arguments: --network_module"),
])
def test_bad_input_is_refused_before_loading(script, extra, message, tiny_default, tmp_path, capsys, monkeypatch):
    import importlib

    from library.families.sd import SDFamily

    monkeypatch.setattr(SDFamily, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.chdir(tmp_path)
    _metadata(tiny_default, tmp_path / "meta.json")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(importlib.import_module(script).main, _db_args(tiny_default, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and message in err, err[-2000:]


def test_an_sdxl_file_is_pointed_elsewhere(tiny_default, tmp_path, capsys):
    import train_db
    from library.models.sdxl_loading import save_sdxl_single_file
    from library.models.tiny import make_tiny_sdxl

    save_sdxl_single_file(tmp_path / "xl.safetensors", make_tiny_sdxl(0))
    args = _db_args(tiny_default, tmp_path / "o")
    args[1] = str(tmp_path / "xl.safetensors")
    with pytest.raises(SystemExit):
        run_cli(train_db.main, args)
    err = capsys.readouterr().err
    assert "is not an SD1.x/SD2.x checkpoint (it looks like: sdxl); use sdxl_train.py" in err


def test_ema_is_saved_restored_and_pruned(tiny_default, tmp_path):
    """--ema --ema_save_mode both: every save has the weights and their average (<name>-ema); the
    average equals one recomputed by hand from the saved weights of every step (diffusers' warm-up
    decay), --save_last_n_steps prunes both files, and a resumed run ends with both bit-identical."""
    ema = ["--ema", "--ema_decay", "0.5", "--ema_save_mode", "both", "--save_every_n_steps", "1", "--save_state",
           "--stop_text_encoder_training", "-1"]
    run_script("train_db.py", *_db_args(tiny_default, tmp_path / "run", *ema, "--save_last_n_steps", "1"), check=True)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("*.safetensors")) == [
        "last-ema.safetensors", "last-step00000002-ema.safetensors", "last-step00000002.safetensors",
        "last-step00000003-ema.safetensors", "last-step00000003.safetensors", "last.safetensors"]
    # the average by hand, from the base and the weights after steps 1-4 (a run that keeps every save)
    run_script("train_db.py", *_db_args(tiny_default, tmp_path / "all", *ema), check=True)
    steps = [load_file(str(tmp_path / "all" / f"last-step0000000{i}.safetensors")) for i in (1, 2, 3)]
    steps.append(load_file(str(tmp_path / "all" / "last.safetensors")))
    average = {k: v.clone() for k, v in part(load_file(str(tiny_default / "model" / "tiny-sd15.safetensors")),
                                                 UNET).items()}
    for n, weights in enumerate(steps):
        d = min(0.5, (1 + n) / (10 + n))
        for key in average:
            average[key].mul_(d).add_(weights[key], alpha=1 - d)
    saved = load_file(str(tmp_path / "all" / "last-ema.safetensors"))
    for key, value in average.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=1e-7, msg=key)
    assert same_tensors(part(saved, TE), part(steps[-1], TE))  # the frozen text encoder is not averaged
    run_script("train_db.py", *_db_args(tiny_default, tmp_path / "resumed", *ema, "--save_last_n_steps", "1",
                                        "--resume", str(run / "last-step00000002-state")), check=True)
    for name in ("last.safetensors", "last-ema.safetensors"):
        assert same_tensors(load_file(str(tmp_path / "resumed" / name)), load_file(str(run / name))), name


def test_sigkill_then_resume_latest_with_ema(tiny_default, tmp_path):
    """A full run with --ema killed (SIGKILL) once a state exists, resumed with --resume latest,
    ends bit-identical to the run never stopped (the average too: it is the saved model)."""

    from tests.scripts.test_resume import _kill_when, _start, _state_steps

    extra = ("--ema", "--ema_decay", "0.5", "--save_every_n_steps", "1", "--save_state", "--max_train_steps", "10")
    run_script("train_db.py", *_db_args(tiny_default, tmp_path / "whole", *extra), check=True)
    args = _db_args(tiny_default, tmp_path / "killed", *extra)
    _kill_when(_start(args, "train_db.py"), lambda: any(s >= 3 for s in _state_steps(tmp_path / "killed")))
    assert not (tmp_path / "killed" / "last.safetensors").exists()
    run_script("train_db.py", *args, "--resume", "latest", check=True)
    assert same_tensors(load_file(str(tmp_path / "killed" / "last.safetensors")),
                 load_file(str(tmp_path / "whole" / "last.safetensors")))
