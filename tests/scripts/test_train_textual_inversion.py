"""train_textual_inversion.py and sdxl_train_textual_inversion.py: new token vectors on the one
trainer. Files in the layouts users load (diffusers' load_textual_inversion reads them and encodes
a prompt as our gen_img.py loader does), only the vectors train, templates, exact resume after
SIGKILL, a learning test with a random-vector control, and bad input refused before any model
loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.utils.errors import run_cli
from tests.conftest import run_in_process, run_script

TOKEN = "zqshape"


def _dataset(tiny: Path, out: Path, caption: str = TOKEN) -> Path:
    """The tiny default's training images, each captioned ``caption`` (its subset's class_tokens)."""
    toml = out / "ti_dataset.toml"
    toml.write_text(f'''[general]
enable_bucket = false
caption_extension = ".none"

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{next((tiny / "train").iterdir()).as_posix()}"
  class_tokens = "{caption}"
  num_repeats = 4
''', encoding="utf-8")
    return toml


def _args(model: Path, toml: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--dataset_config", str(toml), "--output_dir", str(out),
            "--token_string", TOKEN, "--seed", "3", "--max_train_steps", "4", "--learning_rate", "5e-2",
            "--console_log_level", "WARNING", *extra]


def _sd1(tiny: Path) -> Path:
    return tiny / "model" / "tiny-sd15.safetensors"


@pytest.fixture(scope="module")
def sd1_run(tiny_default, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ti_sd1")
    run_script("train_textual_inversion.py", *_args(
        _sd1(tiny_default), _dataset(tiny_default, out), out, "--output_name", TOKEN, "--init_word", "circle",
        "--num_vectors_per_token", "2", "--save_every_n_steps", "2", "--sample_prompts",
        str(tiny_default / "prompts.txt"), "--sample_every_n_steps", "4"), check=True)
    return out


def test_sd1_file_layout_and_metadata(sd1_run, tiny_default):
    with safe_open(str(sd1_run / f"{TOKEN}.safetensors"), "pt") as f:
        keys, meta, vectors = list(f.keys()), f.metadata(), f.get_tensor("emb_params")
    assert keys == ["emb_params"] and vectors.shape == (2, 32)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["ss_token_string"] == TOKEN and meta["ss_num_vectors_per_token"] == "2"
    assert (sd1_run / f"{TOKEN}-step00000002.safetensors").is_file()
    assert len(list((sd1_run / "sample").glob("*.png"))) == 2
    from library.models.sd_loading import load_sd_model

    base = load_sd_model(str(_sd1(tiny_default)), tokenizer_dir=str(tiny_default / "model"))
    shape_id = base.tokenizer("circle", add_special_tokens=False).input_ids[0]
    start = base.text_encoder.get_input_embeddings().weight[shape_id]
    assert all(not torch.equal(v, start) for v in vectors)  # both vectors started as "circle" and moved


def test_diffusers_reads_it_and_encodes_as_our_loader(sd1_run, tiny_default, tmp_path):
    """diffusers' load_textual_inversion on a pipeline of the same model gives the prompt encoding
    our gen_img.py loader gives (both expand the word into its two tokens)."""
    from diffusers import StableDiffusionPipeline

    from library.families.sd import SDFamily
    from library.generation.textual_inversion import load_textual_inversions
    from library.models.checkpoints import read_model, write_diffusers

    write_diffusers(read_model(str(_sd1(tiny_default)), tokenizer_dir=str(tiny_default / "model")), tmp_path / "p")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "p"), safety_checker=None)
    pipe.load_textual_inversion(str(sd1_run / f"{TOKEN}.safetensors"), token=TOKEN)
    theirs = pipe.encode_prompt(f"a {TOKEN} on red", "cpu", 1, False)[0]
    family = SDFamily()
    models = family.load(str(_sd1(tiny_default)), torch.float32, str(tiny_default / "model"))
    ti = load_textual_inversions([str(sd1_run / f"{TOKEN}.safetensors")], family, models)
    with torch.no_grad():
        ours = family.encode_prompts(models, [ti.expand(f"a {TOKEN} on red")], torch.device("cpu"))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_templates_pt_file_and_gen_img(tiny_default, tmp_path):
    """--use_object_template trains from captions that do not name the token; --save_model_as pt
    writes AUTOMATIC1111's form, which gen_img.py reads (the word is the file name)."""
    toml = _dataset(tiny_default, tmp_path, caption="shape")
    run_script("train_textual_inversion.py", *_args(_sd1(tiny_default), toml, tmp_path, "--output_name", TOKEN,
                                                    "--use_object_template", "--save_model_as", "pt",
                                                    "--max_train_steps", "2"), check=True)
    data = torch.load(str(tmp_path / f"{TOKEN}.pt"), weights_only=True)
    assert data["name"] == TOKEN and data["string_to_param"]["*"].shape == (1, 32)
    run_script("gen_img.py", "--ckpt", str(_sd1(tiny_default)), "--prompt", f"a {TOKEN}", "--W", "64", "--H", "64",
               "--steps", "2", "--textual_inversion_embeddings", str(tmp_path / f"{TOKEN}.pt"), "--outdir",
               str(tmp_path / "gen"), check=True)
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1


def test_sdxl_two_encoders(tmp_path_factory, tmp_path):
    """Each SDXL encoder gets its vectors (clip_l at CLIP-L's width, clip_g at bigG's), and
    diffusers' loader puts each part into its encoder."""
    from diffusers import StableDiffusionXLPipeline

    from library.models.checkpoints import read_model, write_diffusers

    data = tmp_path_factory.mktemp("ti_sdxl")
    run_script("tools/make_tiny_default.py", "--out", str(data), "--family", "sdxl", check=True)
    model = data / "model" / "tiny-sdxl.safetensors"
    run_script("sdxl_train_textual_inversion.py", *_args(model, _dataset(data, tmp_path), tmp_path, "--output_name",
                                                         TOKEN, "--init_word", "circle", "--max_train_steps", "2"),
               check=True)
    saved = load_file(str(tmp_path / f"{TOKEN}.safetensors"))
    write_diffusers(read_model(str(model), tokenizer_dir=str(data / "model")), tmp_path / "p")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "p"))
    assert saved["clip_l"].shape[1] == pipe.text_encoder.config.hidden_size
    assert saved["clip_g"].shape[1] == pipe.text_encoder_2.config.hidden_size
    assert saved["clip_l"].shape[1] != saved["clip_g"].shape[1]
    pipe.load_textual_inversion(saved["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(saved["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        assert torch.equal(row, saved[key][0])


def test_sigkill_then_resume_latest(tiny_default, tmp_path):
    from tests.scripts.test_resume import _kill_when, _start, _state_steps

    toml = _dataset(tiny_default, tmp_path)
    extra = ("--init_word", "circle", "--save_every_n_steps", "1", "--save_state", "--max_train_steps", "8")
    run_script("train_textual_inversion.py", *_args(_sd1(tiny_default), toml, tmp_path / "whole", *extra), check=True)
    args = _args(_sd1(tiny_default), toml, tmp_path / "killed", *extra)
    _kill_when(_start(args, "train_textual_inversion.py"),
               lambda: any(s >= 3 for s in _state_steps(tmp_path / "killed")))
    assert not (tmp_path / "killed" / "last.safetensors").exists()
    run_script("train_textual_inversion.py", *args, "--resume", "latest", check=True)
    killed = load_file(str(tmp_path / "killed" / "last.safetensors"))
    assert torch.equal(killed["emb_params"], load_file(str(tmp_path / "whole" / "last.safetensors"))["emb_params"])


@pytest.mark.parametrize("script, extra, message", [
    ("train_textual_inversion", ["--token_string", "circle"], "--token_string circle: already a word"),
    ("train_textual_inversion", ["--token_string", "zq shape"], "one word, without spaces"),
    ("train_textual_inversion", ["--init_word", "red circle"], "--init_word 'red circle' is 2 tokens"),
    ("train_textual_inversion", ["--weights", "two.safetensors"], "--num_vectors_per_token is 1"),
    ("train_textual_inversion", ["--weights", "xl.safetensors"], "an SDXL embedding (clip_l + clip_g)"),
    ("train_textual_inversion", ["--weights", "wide.safetensors"], "vectors are 48 wide, the model's text encoder "
                                                                   "takes 32"),
    ("train_textual_inversion", ["--cache_text_encoder_outputs"], "change the text encoder's output"),
    ("sdxl_train_textual_inversion", [], "is not an SDXL checkpoint"),
    ("train_textual_inversion", ["--dataset_config", "mult.toml"], "a textual inversion run has no network"),
])
def test_bad_input_is_refused_before_loading(script, extra, message, tiny_default, tmp_path, capsys, monkeypatch):
    import importlib

    from library.families.sd import SDFamily
    from library.models.textual_inversion import write_embedding

    monkeypatch.setattr(SDFamily, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.chdir(tmp_path)
    write_embedding(tmp_path / "two.safetensors", [torch.zeros(2, 32)], ("",), "two")
    write_embedding(tmp_path / "wide.safetensors", [torch.zeros(1, 48)], ("",), "wide")
    write_embedding(tmp_path / "xl.safetensors", [torch.zeros(1, 32), torch.zeros(1, 64)], ("clip_l", "clip_g"), "x")
    toml = _dataset(tiny_default, tmp_path)
    multiplied = toml.read_text().replace("batch_size = 2", "batch_size = 2\nnetwork_multiplier = 0.5")
    (tmp_path / "mult.toml").write_text(multiplied)
    args = _args(_sd1(tiny_default), toml, tmp_path / "out", *extra)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(importlib.import_module(script).main, args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and message in err, err[-2000:]


def test_captions_without_the_token_and_sd3_are_refused(tiny_default, tmp_path, tiny_family_models):
    proc = run_in_process("train_textual_inversion.py", *_args(_sd1(tiny_default), _dataset(tiny_default, tmp_path,
                                                                                        "shape"), tmp_path / "o"))
    assert proc.returncode == 2 and "contains --token_string zqshape" in proc.stderr and "10_sks shape" in proc.stderr
    proc = run_in_process("sdxl_train_textual_inversion.py", *_args(tiny_family_models["sd3"], _dataset(
        tiny_default, tmp_path), tmp_path / "o"))
    assert proc.returncode == 2 and "textual inversion is not available for SD3" in proc.stderr, proc.stderr[-800:]
