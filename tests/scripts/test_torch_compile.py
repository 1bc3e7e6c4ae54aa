"""--torch_compile: the denoiser's blocks compiled one by one give the eager run's losses and
weights (inductor with LoRA hooks; aot_eager, which traces and splits the same graphs without
generating code, with gradient checkpointing and full-weight training); backends and combinations
that cannot work are refused before any model loads."""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file

from library.utils.errors import run_cli
from tests.conftest import run_script, tiny_train_args


def _losses(out) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = [p for p in (out / "logs").glob("*/*") if p.is_dir()]
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("loss/current")]


def _relative(a: dict, b: dict) -> float:
    """|a - b| / |a| over all tensors together."""
    num = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a)
    return float((num / sum((a[k].float() ** 2).sum() for k in a)).sqrt())


def _pair(script: str, tiny_default, tmp_path, *extra: str, common: tuple = ()) -> tuple[tuple, tuple]:
    """An eager run and a --torch_compile run (with ``extra``), both with ``common``: (losses, weights) each."""
    runs = []
    for name, flags in (("eager", ()), ("compiled", ("--torch_compile", *extra))):
        out = tmp_path / name
        run_script(script, *tiny_train_args(tiny_default, out, "--output_name", "run", "--max_train_steps", "3",
                                            "--logging_dir", str(out / "logs"), *common, *flags), check=True)
        runs.append((_losses(out), load_file(str(out / "run.safetensors"))))
    return runs[0], runs[1]


def test_inductor_lora_steps_equal_eager(tiny_default, tmp_path):
    (eager_loss, eager), (compiled_loss, compiled) = _pair("train_network.py", tiny_default, tmp_path)
    assert len(eager_loss) == 3 and compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    assert eager.keys() == compiled.keys() and _relative(eager, compiled) < 1e-4


def test_aot_eager_full_weights_with_checkpointing(tiny_default, tmp_path):
    (eager_loss, eager), (compiled_loss, compiled) = _pair(
        "train_db.py", tiny_default, tmp_path, "--dynamo_backend", "aot_eager", "--gradient_checkpointing")
    unet = {k: v for k, v in eager.items() if k.startswith("model.diffusion_model.")}
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    assert _relative(unet, compiled) < 1e-4
    base = load_file(str(tiny_default / "model" / "tiny-sd15.safetensors"))
    assert any(not torch.equal(unet[k], base[k]) for k in unet)  # the compiled blocks trained


@pytest.mark.parametrize("script, extra, message", [
    ("train_network", ["--dynamo_backend", "nosuch"], "--dynamo_backend nosuch: not a torch.compile backend here"),
    ("train_network", ["--dynamo_backend", "tensorrt"], "needs the torch-tensorrt package"),
    ("train_network", ["--dynamo_backend", "NO"], "--torch_compile with --dynamo_backend no"),
    ("sd3_train_network", ["--blocks_to_swap", "1"], "--torch_compile cannot be combined with --blocks_to_swap"),
])
def test_bad_backends_are_refused_before_loading(script, extra, message, tiny_default, tmp_path, capsys,
                                                  monkeypatch):
    from library.families.base import ModelFamily

    for family in ModelFamily.__subclasses__() + [c for s in ModelFamily.__subclasses__() for c in s.__subclasses__()]:
        monkeypatch.setattr(family, "load", lambda *a, **k: pytest.fail("a model was loaded"), raising=False)
    args = tiny_train_args(tiny_default, tmp_path / "out", "--torch_compile", *extra)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(importlib.import_module(script).main, args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err[-2000:]


def test_gen_img_compiled_with_a_lora_and_per_line_strengths(tiny_default, tmp_path):
    """gen_img.py --torch_compile: the same images as eager, with a hooked LoRA whose strength a
    prompt line changes after the blocks were compiled (the compiled code sees the new value)."""
    import numpy as np
    from PIL import Image

    import gen_img
    from library.families.sd import SDFamily
    from networks import lora

    model = str(tiny_default / "model" / "tiny-sd15.safetensors")
    models = SDFamily().load(model, torch.float32, None)
    net = lora.create_network(1.0, 4, 4, None, models.text_encoders[0], models.denoiser)
    torch.manual_seed(1)
    for m in net.all_loras():
        torch.nn.init.normal_(m.lora_up.weight, std=0.5)
    net.save_weights(str(tmp_path / "lora.safetensors"), torch.float32, {})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\nred circle --am 0.2\n", encoding="utf-8")
    images = {}
    for name, flags in (("eager", ()), ("compiled", ("--torch_compile", "--dynamo_backend", "aot_eager"))):
        run_cli(gen_img.main, ["--ckpt", model, "--from_file", str(prompts), "--W", "64", "--H", "64", "--steps", "3",
                               "--seed", "5", "--sequential_file_name", "--network_weights",
                               str(tmp_path / "lora.safetensors"), "--network_mul", "1.0", "--outdir",
                               str(tmp_path / name), *flags])
        images[name] = [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
                        for p in sorted((tmp_path / name).glob("*.png"))]
    assert len(images["eager"]) == 2 and np.abs(images["eager"][0] - images["eager"][1]).max() > 10
    for eager, compiled in zip(images["eager"], images["compiled"]):
        assert np.abs(eager - compiled).max() <= 1


def test_aot_eager_lycoris_equals_eager(tiny_default, tmp_path):
    """LyCORIS modules (LoHa) replace the layers' forwards their own way; the compiled blocks trace them too."""
    pytest.importorskip("lycoris")
    (eager_loss, eager), (compiled_loss, compiled) = _pair(
        "train_network.py", tiny_default, tmp_path, "--dynamo_backend", "aot_eager",
        common=("--network_module", "lycoris.kohya", "--network_dim", "4", "--network_alpha", "4",
                "--network_args", "algo=loha", "preset=attn-mlp"))
    assert any(".hada_w1_a" in k for k in eager)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4) and _relative(eager, compiled) < 1e-4
