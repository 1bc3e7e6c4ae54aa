"""Disk latent caches: kohya's names and keys, reused only while everything they depend on is unchanged."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from library.data.dataset import build_dataset_group
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.latent_cache import cache_latents, cache_path
from library.models.fingerprint import module_fingerprint


@pytest.fixture
def data(tiny_default, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(tiny_default / "train" / "10_sks shape", folder)
    return folder


def _group(folder, resolution=64, flip=False):
    cfg = DatasetConfig((resolution, resolution), subsets=(SubsetConfig(str(folder), flip_aug=flip),))
    return build_dataset_group([cfg], 0, 1.0, False)[0]


def _run(folder, vae, vae_id="v1", **kw):
    group = _group(folder, **kw)
    counts = cache_latents(group, lambda px: vae.encode(px).latent_dist.mean * 0.18215, 4, 4, "sd", vae_id,
                           show_progress=False)
    return group, counts


def test_disk_cache_names_keys_and_reuse(data, tiny_sd1):
    vae = tiny_sd1.vae
    group, counts = _run(data, vae)
    assert counts == {"loaded": 0, "encoded": 8}
    item = group.items[0]
    path = cache_path(item, "sd")
    assert path.name == "img00_0064x0064_sd.npz"
    with np.load(path) as npz:
        assert {"latents", "original_size", "crop_ltrb", "cache_record"} <= set(npz.files)
        assert npz["latents"].shape == (4, 8, 8) and list(npz["original_size"]) == [64, 64]
    again, counts = _run(data, vae)
    assert counts == {"loaded": 8, "encoded": 0}
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(group.items, again.items))


def test_stale_or_broken_caches_are_rebuilt(data, tiny_sd1):
    vae = tiny_sd1.vae
    group, _ = _run(data, vae)
    first = group.items[0]
    # the image changed on disk
    st = os.stat(first.path)
    os.utime(first.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    # a cache file is truncated
    broken = cache_path(group.items[1], "sd")
    broken.write_bytes(broken.read_bytes()[:50])
    _, counts = _run(data, vae)
    assert counts == {"loaded": 6, "encoded": 2}
    # another VAE, another bucket, or flip_aug now on: everything is rebuilt
    assert _run(data, vae, vae_id="v2")[1] == {"loaded": 0, "encoded": 8}
    assert _run(data, vae, vae_id="v2", resolution=128)[1]["encoded"] == 8
    flipped, counts = _run(data, vae, vae_id="v2", resolution=128, flip=True)
    assert counts["encoded"] == 8 and flipped.items[0].latents_flipped.shape == (4, 16, 16)
    with np.load(cache_path(flipped.items[0], "sd")) as npz:
        assert "latents_flipped" in npz.files


def test_vae_fingerprint_changes_with_weights(tiny_sd1):
    before = module_fingerprint(tiny_sd1.vae)
    with torch.no_grad():
        next(iter(tiny_sd1.vae.parameters())).add_(1.0)
    assert module_fingerprint(tiny_sd1.vae) != before
