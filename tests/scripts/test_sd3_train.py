"""sd3_train.py: SD3's own weights on the one trainer. The MMDiT and CLIP-L train, CLIP-G at rate 0,
T5 and the VAE keep their bytes; the file opens in diffusers' from_single_file as trained and
generates with gen_img.py; block swap of the trained blocks (unfused AdamW, fused Adafactor)
gives the same model as no swap, and a swapped fused run resumes bit-identically; saved files
bundle the encoders the base file bundled, trained ones, and those asked for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import part, run_in_process, run_script, same_tensors

SCRIPT = "sd3_train.py"
MMDIT, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, CLIP_G, T5 = (f"text_encoders.{n}.transformer." for n in ("clip_l", "clip_g", "t5xxl"))
ADAFACTOR = ("--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
             "warmup_init=False")


@pytest.fixture(scope="module")
def tiny_sd3(tiny_family_models) -> Path:
    """The session's tiny SD3 folder (model, dataset, dataset TOML, prompts); runs write elsewhere."""
    return tiny_family_models["sd3"].parent.parent


def _args(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny / "model" / "tiny-sd3.safetensors"), "--dataset_config",
            str(tiny / "dataset.toml"), "--output_dir", str(out), "--seed", "3", "--max_train_steps", "4",
            "--learning_rate", "1e-3", "--t5xxl_max_token_length", "16", "--console_log_level", "WARNING", *extra]




@pytest.fixture(scope="module")
def plain(tiny_sd3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd3_full")
    run_script(SCRIPT, *_args(tiny_sd3, out, "--train_text_encoder", "--learning_rate_te2", "0", "--sample_prompts",
                              str(tiny_sd3 / "prompts.txt"), "--sample_every_n_steps", "4"), check=True)
    return out


def test_what_trains_and_what_keeps_its_bytes(tiny_sd3, plain):
    base = load_file(str(tiny_sd3 / "model" / "tiny-sd3.safetensors"))
    tuned = load_file(str(plain / "last.safetensors"))
    assert base.keys() == tuned.keys()  # the base file bundled all three encoders: so does the result
    changed = [k for k in part(base, MMDIT) if not torch.equal(base[k], tuned[k])]
    assert len(changed) >= len(part(base, MMDIT)) - 1  # every trained tensor (pos_embed is a fixed table)
    assert all(not torch.equal(base[k], tuned[k]) for k in part(base, CLIP_L))  # --learning_rate
    for frozen in (CLIP_G, T5, VAE):  # --learning_rate_te2 0; T5 never trains; the VAE neither
        assert same_tensors(part(base, frozen), part(tuned, frozen)), frozen
    with safe_open(str(plain / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd3_medium" and meta["ss_training_kind"] == "sd3"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium"  # a whole model, not "/lora"
    assert len(list((plain / "sample").glob("*.png"))) == 2


def test_the_file_opens_in_diffusers_and_generates(tiny_sd3, plain, tmp_path):
    from diffusers import SD3Transformer2DModel

    from library.models.sd3_loading import load_sd3_single_file

    ours = load_sd3_single_file(str(plain / "last.safetensors"))
    ours.transformer.save_config(str(tmp_path / "cfg"))
    theirs = SD3Transformer2DModel.from_single_file(str(plain / "last.safetensors"), config=str(tmp_path / "cfg"))
    mine = ours.transformer.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in theirs.state_dict().items())
    run_script("gen_img.py", "--ckpt", str(plain / "last.safetensors"), "--prompt", "red circle", "--W", "64", "--H",
               "64", "--steps", "2", "--t5xxl_max_token_length", "16", "--outdir", str(tmp_path / "gen"),
               "--tokenizer_cache_dir", str(tiny_sd3 / "model"), check=True)
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1


def test_block_swap_trains_the_same_model(tiny_sd3, plain, tmp_path):
    """Unfused AdamW: the swapped blocks' gradients travel to host memory with them and their
    optimizer step runs there; the result equals the run without swapping, tensor for tensor."""
    run_script(SCRIPT, *_args(tiny_sd3, tmp_path, "--train_text_encoder", "--learning_rate_te2", "0",
                              "--blocks_to_swap", "1"), check=True)
    assert same_tensors(load_file(str(plain / "last.safetensors")), load_file(str(tmp_path / "last.safetensors")))


def test_fused_backward_with_block_swap_equals_no_swap_and_resumes(tiny_sd3, tmp_path):
    fused = (*ADAFACTOR, "--fused_backward_pass", "--gradient_checkpointing")
    run_script(SCRIPT, *_args(tiny_sd3, tmp_path / "plain", *fused), check=True)
    run_script(SCRIPT, *_args(tiny_sd3, tmp_path / "swap", *fused, "--blocks_to_swap", "1", "--save_every_n_steps",
                              "2", "--save_state"), check=True)
    plain = load_file(str(tmp_path / "plain" / "last.safetensors"))
    assert same_tensors(plain, load_file(str(tmp_path / "swap" / "last.safetensors")))
    run_script(SCRIPT, *_args(tiny_sd3, tmp_path / "resumed", *fused, "--blocks_to_swap", "1", "--resume",
                              str(tmp_path / "swap" / "last-step00000002-state")), check=True)
    assert same_tensors(plain, load_file(str(tmp_path / "resumed" / "last.safetensors")))


def test_the_last_blocks_frozen_keep_their_bytes(tiny_sd3, tmp_path):
    """--num_last_block_to_freeze 1: the MMDiT's last joint block keeps its bytes, the others train."""
    run_script(SCRIPT, *_args(tiny_sd3, tmp_path, "--num_last_block_to_freeze", "1", "--max_train_steps", "2"),
               check=True)
    base = load_file(str(tiny_sd3 / "model" / "tiny-sd3.safetensors"))
    tuned = load_file(str(tmp_path / "last.safetensors"))
    count = 1 + max(int(k[len(MMDIT):].split(".")[1]) for k in part(base, MMDIT + "joint_blocks."))
    assert count >= 2
    for i in range(count):
        block = part(base, f"{MMDIT}joint_blocks.{i}.")
        same = same_tensors(block, part(tuned, f"{MMDIT}joint_blocks.{i}."))
        assert same == (i == count - 1), (i, count)


def test_train_t5xxl_trains_t5_at_its_own_rate(tiny_sd3, tmp_path):
    """--train_t5xxl: T5 joins the CLIPs in the optimizer (--learning_rate_te3) and is written."""
    run_script(SCRIPT, *_args(tiny_sd3, tmp_path, "--train_text_encoder", "--train_t5xxl", "--learning_rate_te2", "0",
                              "--learning_rate_te3", "1e-3", "--max_train_steps", "2"), check=True)
    base = load_file(str(tiny_sd3 / "model" / "tiny-sd3.safetensors"))
    tuned = load_file(str(tmp_path / "last.safetensors"))
    t5 = part(base, T5)
    changed = [k for k in t5 if not torch.equal(t5[k], tuned[k])]
    assert len(changed) >= len(t5) - 1, f"{len(changed)} of {len(t5)} T5 tensors trained"  # -1: unused bias table
    assert same_tensors(part(base, CLIP_G), part(tuned, CLIP_G))  # --learning_rate_te2 0


def test_t5_cache_only_trains_as_live_t5(tiny_sd3, plain, tmp_path):
    """--use_t5xxl_cache_only: T5's outputs come from the cache while the CLIPs run (and train) at
    every step; the result equals the run that encodes all three at every step. Bit for bit: T5
    encodes batches of the training batch's size (2) either way, so the same kernels run on the
    same shapes, and each caption's rows do not depend on the other caption's."""
    run_script(SCRIPT, *_args(tiny_sd3, tmp_path, "--train_text_encoder", "--learning_rate_te2", "0",
                              "--use_t5xxl_cache_only", "--text_encoder_batch_size", "2"), check=True)
    assert same_tensors(load_file(str(plain / "last.safetensors")), load_file(str(tmp_path / "last.safetensors")))


def test_encode_prompt_parts_gives_each_encoders_own_part():
    """The partial cache relies on each encoder's keys depending on that encoder only."""
    from library.families.base import LoadedModels
    from library.families.sd3 import SD3Family, SD3Options
    from library.models.tiny import make_tiny_sd3

    parts = make_tiny_sd3(0)
    tokenizers = [parts.tokenizers[k] for k in ("clip_l", "clip_g", "t5xxl")]
    models = LoadedModels(parts.transformer, parts.vae, parts.text_encoder_list, tokenizers, parts=parts)
    family, captions = SD3Family(SD3Options(t5xxl_max_token_length=8)), ["a red circle", "sks"]
    cpu = torch.device("cpu")
    with torch.no_grad():
        whole = family.encode_prompts(models, captions, cpu)
        t5 = family.encode_prompt_parts(models, captions, cpu, [2])
        clips = family.encode_prompt_parts(models, captions, cpu, [0, 1])
    assert t5.keys() == {"t5"} and torch.equal(t5["t5"], whole["t5"])
    assert clips.keys() == whole.keys() - {"t5"} and all(torch.equal(clips[k], whole[k]) for k in clips)


def test_saved_files_bundle_what_the_base_bundled_trained_or_asked(tmp_path):
    """A base whose encoders came from separate files: unchanged encoders stay out (as kohya
    writes them), trained CLIPs go in, --save_t5xxl adds T5."""
    from library.families.base import LoadedModels
    from library.families.sd3 import SD3Family, SD3Options
    from library.models.tiny import make_tiny_sd3

    parts = make_tiny_sd3(0)
    parts.bundled = frozenset()
    models = LoadedModels(parts.transformer, parts.vae, parts.text_encoder_list, [], parts=parts)

    def prefixes(options: SD3Options, trained: tuple = ()) -> set[str]:
        SD3Family(options).save_model(models, str(tmp_path / "m.safetensors"), None, None, False, trained)
        with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
            return {p for p in (CLIP_L, CLIP_G, T5) if any(k.startswith(p) for k in f.keys())}

    assert prefixes(SD3Options()) == set()
    assert prefixes(SD3Options(), trained=(parts.clip_l,)) == {CLIP_L, CLIP_G}  # written as a pair
    assert prefixes(SD3Options(), trained=(parts.clip_l, parts.clip_g, parts.t5xxl)) == {CLIP_L, CLIP_G, T5}
    assert prefixes(SD3Options(save_t5xxl=True)) == {T5}
    assert prefixes(SD3Options(save_clip=True)) == {CLIP_L, CLIP_G}


@pytest.mark.parametrize("extra, message", [
    (["--save_model_as", "ckpt"], "SD3 models are written as .safetensors"),
    (["--cpu_offload_checkpointing"], "--cpu_offload_checkpointing is not available"),
    (["--train_text_encoder", "--cache_text_encoder_outputs"], "--use_t5xxl_cache_only caches the frozen T5"),
    (["--train_t5xxl"], "--train_t5xxl trains T5-XXL beside CLIP-L/G: add --train_text_encoder"),
    (["--noise_offset", "0.1"], "not used by SD3 (flow matching)"),
    (["--num_last_block_to_freeze", "0"], "--num_last_block_to_freeze 0: give a number of blocks of at least 1"),
    (["--deepspeed", "--blocks_to_swap", "2"], "--deepspeed with --blocks_to_swap: not together in this version"),
    (["--deepspeed", "--zero_stage", "2"], "--deepspeed shards the weights over processes, and this run has one"),
    (["--fused_optimizer_groups", "2", "--fused_backward_pass", "--optimizer_type", "adafactor"], "use one of them"),
])
def test_bad_input(tiny_sd3, tmp_path, extra, message):
    proc = run_in_process(SCRIPT, *_args(tiny_sd3, tmp_path, *extra))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("extra, message", [
    (["--use_t5xxl_cache_only"], "--train_t5xxl with --use_t5xxl_cache_only: a trained T5's outputs change"),
    (["--t5xxl_device", "cpu", "--t5xxl_dtype", "bf16"], "remove --t5xxl_device and --t5xxl_dtype"),
])
def test_train_t5xxl_refuses_what_cannot_hold(tiny_sd3, tmp_path, extra, message):
    """Checked in-process (the refusals come before any model loads; test_bad_input covers the exit)."""
    import sd3_train
    from library.utils.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        sd3_train.main(_args(tiny_sd3, tmp_path, "--train_text_encoder", "--train_t5xxl", *extra))
    assert not list(tmp_path.glob("*.safetensors"))
