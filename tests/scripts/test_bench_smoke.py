"""A short smoke of the benchmark on the tiny model (the full-size run lives outside CI)."""

import json

from tests.conftest import run_script


def test_bench_train_step_smoke():
    proc = run_script("bench/bench_train_step.py", "--tiny", "--size", "64", "--steps", "2", "--warmup", "1",
                      "--from_file", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # file*: train_network.py's main on a written file
    for mode in ("bare", "bare_routed", "trainer", "file", "file_cached", "file_bf16"):
        assert result[mode]["steps"] == 2 and result[mode]["median_s"] > 0, mode
    assert 0 < result["trainer"]["peak_rss_gib"] < 6.5
    assert 0 < result["file"]["startup_s"] < result["file"]["first_step_s"]


def test_bench_load_smoke():
    proc = run_script("bench/bench_load.py", "--tiny", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-2])
    assert result["loaded_bytes"] == result["tensor_bytes"] and result["seconds"] > 0


def test_bench_sdxl_train_step_smoke():
    proc = run_script("bench/bench_sdxl_train_step.py", "--tiny", "--size", "64", "--steps", "2", "--from_file",
                      check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode in ("bare", "trainer", "file"):  # file: sdxl_train_network.py's main on a written bf16 file
        assert result[mode]["steps"] == 2 and result[mode]["median_s"] > 0, mode
    assert result["file"]["startup_s"] > 0


def test_bench_sd3_train_step_smoke():
    proc = run_script("bench/bench_sd3_train_step.py", "--tiny", "--size", "64", "--steps", "2", "--blocks_to_swap",
                      "1", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["plain"]["max_blocks_resident"] == 3 and result["swap"]["max_blocks_resident"] == 2
    assert result["swap"]["median_s"] > 0


def test_bench_gen_img_smoke():
    proc = run_script("bench/bench_gen_img.py", "--tiny", "--size", "64", "--steps", "2", "--images", "1", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ours"]["images_per_s"] > 0 and result["diffusers"]["images_per_s"] > 0


def test_bench_file_tools_smoke():
    proc = run_script("bench/bench_file_tools.py", "--tiny", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tensor_bytes"] > 0
    assert all(result[tool]["seconds"] > 0 for tool in ("imports", "merge", "to_folder", "to_file"))


def test_bench_full_train_step_smoke():
    proc = run_script("bench/bench_full_train_step.py", "--tiny", "--size", "64", "--steps", "2", "--warmup", "1",
                      "--live_memory", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(result[m]["steps"] == 2 and result[m]["median_s"] > 0
               for m in ("bare_adamw", "trainer_adamw", "trainer_adafactor", "trainer_fused"))
    live = result["live"]  # the profiler's figures are deterministic: the fused step holds fewer live tensors
    assert 0 < live["trainer_fused"]["live_peak_gib"] < live["trainer_adafactor"]["live_peak_gib"]
    assert result["fused_saves_live_gib"] > 0


def test_bench_dedup_smoke():
    proc = run_script("bench/bench_dedup.py", "--images", "20", "--hashes", "4000", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hashing"]["images"] == 20 and result["hashing"]["images_per_s"] > 0
    assert all(g["planted_found"] == g["pairs_planted"] for g in result["grouping"])


def test_bench_cpu_options_smoke():
    """Two variants end to end (each child process costs its imports); every variant's set-up is
    checked in-process below."""
    proc = run_script("bench/bench_cpu_options.py", "--tiny", "--size", "64", "--steps", "1", "--warmup", "1",
                      "--variants", "bf16_autocast", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"eager", "bf16_autocast"}
    assert all(r["median_s"] > 0 and r["steps"] == 1 for r in result.values())


def test_bench_cpu_option_variants_apply(monkeypatch):
    import torch

    from bench.bench_cpu_options import VARIANTS, apply_variant
    from library.models.tiny import make_tiny_sd1

    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    threads = torch.get_num_threads()
    try:
        for variant in VARIANTS:
            unet = make_tiny_sd1(0).unet
            context, fmt = apply_variant(variant, unet)
            x = torch.randn(1, 4, 8, 8).contiguous(memory_format=fmt)
            with context():
                out = unet(x, torch.tensor([10]), torch.randn(1, 77, unet.config.cross_attention_dim)).sample
            assert out.shape == x.shape, variant
            assert (out.dtype == torch.bfloat16) == (variant == "bf16_autocast"), variant
    finally:
        torch.set_num_threads(threads)
    assert not torch.backends.mkldnn.enabled  # no_onednn switched it off (restored by monkeypatch)
