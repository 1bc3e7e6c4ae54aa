"""The image-pipeline chain on local files, in one test: generated images (with near copies) -> dedup ->
resize_and_center on a transparent canvas -> caption files -> train_network.py on the tiny model with
--alpha_mask -> gen_img.py with the LoRA."""

from __future__ import annotations

from PIL import Image

from finetune import dedup, resize_and_center
from library.data.images import load_mask
from tests.conftest import run_script
from tests.prep.test_dedup import smooth


def test_raw_images_to_a_lora_and_an_image(tiny_default, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for seed in range(4):
        img = smooth(seed + 10, size=96)
        img.crop((0, 0, 96, 64 + 8 * seed)).save(raw / f"img{seed}.png")  # wide shapes: padding above/below
        (raw / f"img{seed}.txt").write_text("sks shape\n")
    smooth(10, size=96).crop((0, 0, 96, 64)).resize((48, 32)).save(raw / "img0_small.png")  # a near copy
    dedup.main(["--in_dir", str(raw), "--out_dir", str(tmp_path / "unique")])
    assert sorted(p.name for p in (tmp_path / "unique").glob("*.png")) == [f"img{i}.png" for i in range(4)]
    data = tmp_path / "data" / "2_sks shape"
    resize_and_center.main(["--in_dir", str(tmp_path / "unique"), "--out_dir", str(data), "--size", "64",
                            "--background", "transparent"])
    assert sorted(p.name for p in data.iterdir()) == sorted([f"img{i}.png" for i in range(4)] +
                                                            [f"img{i}.txt" for i in range(4)])
    assert Image.open(data / "img0.png").size == (64, 64) and load_mask(str(data / "img0.png"), True)[0].max() == 0
    out = tmp_path / "out"
    run_script("train_network.py", "--pretrained_model_name_or_path",
               str(tiny_default / "model" / "tiny-sd15.safetensors"), "--train_data_dir", str(tmp_path / "data"),
               "--caption_extension", ".txt", "--resolution", "64", "--alpha_mask", "--masked_loss",
               "--network_module", "networks.lora", "--network_dim", "4", "--max_train_steps", "2",
               "--output_dir", str(out), "--output_name", "chain", "--console_log_level", "WARNING", check=True)
    run_script("gen_img.py", "--ckpt", str(tiny_default / "model" / "tiny-sd15.safetensors"), "--tokenizer_cache_dir",
               str(tiny_default / "model"), "--network_module", "networks.lora", "--network_weights",
               str(out / "chain.safetensors"), "--outdir", str(tmp_path / "gen"), "--prompt", "sks shape", "--W", "64",
               "--H", "64", "--steps", "2", check=True)
    assert len(list((tmp_path / "gen").glob("*.png"))) == 1
