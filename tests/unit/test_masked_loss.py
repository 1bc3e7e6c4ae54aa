"""Masked loss: masks follow their images through resize, crop and flip, and weight the loss per pixel."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.dataset import ScanReport, build_dataset_group, scan_subset
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.maths.loss import apply_mask, per_sample_mean


def test_apply_mask_hand_computed():
    loss = torch.ones(1, 1, 2, 2)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, :2] = 1.0  # left half
    assert per_sample_mean(apply_mask(loss, mask)).item() == 0.5
    mask[0, 0, 0, 0] = 0.0  # one of the four pixels of the top-left latent cell
    out = apply_mask(torch.full((1, 1, 2, 2), 2.0), mask)
    assert out[0, 0].tolist() == [[1.5, 0.0], [2.0, 0.0]]  # 2 * 3/4, 0, 2 * 1, 0
    assert torch.equal(apply_mask(loss, None), loss)


def test_family_loss_uses_the_mask():
    from library.families.base import NoisyBatch
    from library.families.sd import SDFamily

    fam = SDFamily()
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    batch = NoisyBatch(pred, torch.tensor([10, 20]), target)
    mask = torch.ones(2, 1, 16, 16)
    mask[1, :, 8:, :] = 0  # bottom half of the second image masked out
    assert fam.per_sample_loss(pred, batch, mask).tolist() == [1.0, 0.5]


def _images(tmp_path):
    img_dir, mask_dir = tmp_path / "img", tmp_path / "mask"
    img_dir.mkdir()
    mask_dir.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 32), (200, 10, 10)).save(img_dir / f"{name}.png")
    m = np.zeros((32, 64, 3), dtype=np.uint8)
    m[:, :16, 0] = 255  # the left quarter counts
    Image.fromarray(m).save(mask_dir / "a.png")
    return img_dir, mask_dir


def test_conditioning_masks_follow_the_image(tmp_path):
    img_dir, mask_dir = _images(tmp_path)
    Image.new("RGB", (10, 10)).save(mask_dir / "b.png")  # wrong size: b is skipped, with the reason
    sub = SubsetConfig(str(img_dir), conditioning_data_dir=str(mask_dir))
    report = ScanReport()
    items = scan_subset(sub, report, strict=False)
    assert [p for p, _ in report.skipped] == [str(img_dir / "b.png")] and "is 10x10" in report.skipped[0][1]
    group, _ = build_dataset_group([DatasetConfig((64, 32), subsets=(sub,))], 0, 1.0, False)
    ds = group.datasets[0]
    item = items[0]
    mask = ds.load_mask(group.items[0], False, ds.crop_box(group.items[0], None))
    assert mask.shape == (1, 32, 64) and mask[0, :, :16].min() == 1 and mask[0, :, 16:].max() == 0
    flipped = ds.load_mask(group.items[0], True, ds.crop_box(group.items[0], None))
    assert flipped[0, :, -16:].min() == 1 and flipped[0, :, :-16].max() == 0
    batch = ds.make_batch([group.items[0]], (0, 0, 0), 0)
    assert batch.masks.shape == (1, 1, 32, 64)
    assert item.mask_path == str(mask_dir / "a.png")


def test_missing_mask_is_skipped_or_stops(tmp_path):
    img_dir, mask_dir = _images(tmp_path)
    sub = SubsetConfig(str(img_dir), conditioning_data_dir=str(mask_dir))
    report = ScanReport()
    scan_subset(sub, report, strict=False)
    assert "no mask with the same name" in report.skipped[0][1]
    from library.utils.errors import UserError
    with pytest.raises(UserError, match="b.png: no mask with the same name"):
        scan_subset(sub, ScanReport(), strict=True)


def test_alpha_mask(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[16:, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "y.png")  # no alpha: all ones
    sub = SubsetConfig(str(tmp_path), alpha_mask=True)
    group, _ = build_dataset_group([DatasetConfig((32, 32), subsets=(sub,))], 0, 1.0, False)
    ds = group.datasets[0]
    masks = {it.path[-5:]: ds.load_mask(it, False, ds.crop_box(it, random.Random(0))) for it in group.items}
    assert masks["x.png"][0, :16].min() == 1 and masks["x.png"][0, 16:].max() == 0
    assert masks["y.png"].min() == 1
