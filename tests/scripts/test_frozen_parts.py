"""The VAE and frozen text encoders leave memory once their outputs are cached and nothing else in
the run uses them: the trained weights are bit-identical to a run that keeps them; whatever sample
images, trained encoders or saved whole models still need stays."""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file

from library.training import residency, trainer
from tests.conftest import tiny_train_args

CACHED = ("--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only")


def _train(monkeypatch, script: str, args: list[str], keep_all: bool = False):
    """Run ``script`` in this process; returns (the run's models, the names it released)."""
    seen = {}
    settle = trainer.Trainer._settle_frozen_parts

    def spy(self, acc, models, group):
        seen["models"] = models
        if keep_all:  # the reference run: every part stays resident, as before this existed
            return residency.Residency(acc.device)
        seen["residency"] = settle(self, acc, models, group)
        return seen["residency"]

    monkeypatch.setattr(trainer.Trainer, "_settle_frozen_parts", spy)
    importlib.import_module(script).main(args)
    return seen["models"], ([] if keep_all else seen["residency"].released)


def _on_meta(module) -> bool:
    return all(t.is_meta for t in [*module.parameters(), *module.buffers()])


def test_released_parts_give_bit_identical_weights(tiny_default, tmp_path, monkeypatch):
    runs = {}
    for name, keep in (("released", False), ("kept", True)):
        out = tmp_path / name
        args = tiny_train_args(tiny_default, out, "--output_name", "lora", "--max_train_steps", "3", *CACHED)
        models, released = _train(monkeypatch, "train_network", args, keep_all=keep)
        runs[name] = load_file(str(out / "lora.safetensors"))
        if keep:
            assert not _on_meta(models.vae) and not _on_meta(models.text_encoders[0])
        else:
            assert released == ["VAE", "text encoder"]
            assert _on_meta(models.vae) and _on_meta(models.text_encoders[0]) and not _on_meta(models.denoiser)
            with pytest.raises(RuntimeError, match="the VAE was released from memory"):
                models.vae.encode(torch.zeros(1, 3, 64, 64, device="meta"))
    assert runs["released"].keys() == runs["kept"].keys()
    assert all(torch.equal(runs["released"][k], runs["kept"][k]) for k in runs["kept"])


@pytest.mark.parametrize("script, extra, released", [
    # sample images need both: they stay (on a GPU they would wait in CPU memory between samples)
    ("train_network", [*CACHED, "--sample_every_n_steps", "2"], []),
    # prompts without a sampling cadence make no images: nothing needs the encoders
    ("train_network", CACHED, ["VAE", "text encoder"]),
    ("train_network", ["--cache_latents"], ["VAE"]),  # the text encoder runs every step
    ("train_network", ["--cache_latents", "--cache_text_encoder_outputs", "--network_train_text_encoder_only"],
     None),  # refused before: caching needs a frozen text encoder
    ("train_network", [], []),  # nothing cached
    ("train_db", ["--cache_latents"], []),  # the saved model holds the VAE and text encoder
])
def test_what_is_still_needed_stays(script, extra, released, tiny_default, tmp_path, monkeypatch):
    args = tiny_train_args(tiny_default, tmp_path / "out", "--output_name", "m", "--max_train_steps", "2",
                           "--sample_prompts", str(tiny_default / "prompts.txt"), *extra)
    if released is None:
        with pytest.raises(Exception, match="network_train_unet_only"):
            _train(monkeypatch, script, args)
        return
    models, names = _train(monkeypatch, script, args)
    assert names == released
    assert _on_meta(models.vae) == ("VAE" in released)
    if "--sample_every_n_steps" in extra:
        assert len(list((tmp_path / "out").rglob("*.png"))) == 2  # at step 2, one per prompt


def test_parts_only_samples_use_are_parked_off_an_accelerator():
    """On a GPU, a part only sample images need waits in CPU memory; on the CPU it stays put."""
    vae, encoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    parts = {"VAE": ([vae], residency.PartUse(steps=False, samples=True)),
             "text encoder": ([encoder], residency.PartUse(steps=True, samples=True))}
    on_gpu = residency.settle_frozen_parts(parts, torch.device("cuda"))
    # (here the VAE's home is the CPU: a family may keep a part there, and sampling puts it back there)
    assert on_gpu.parked == [(vae, torch.device("cpu"))] and on_gpu.released == [] and not _on_meta(vae)
    with on_gpu.for_sampling():
        assert vae.weight.device.type == "cpu"
    on_cpu = residency.settle_frozen_parts(parts, torch.device("cpu"))
    assert on_cpu.parked == [] and on_cpu.released == []
    with on_cpu.for_sampling():
        assert vae(torch.ones(1, 2)).shape == (1, 2)
