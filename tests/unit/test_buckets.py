"""Bucket maths against hand-computed cases (kohya's definitions)."""

from library.data import buckets as bk


def test_bucket_table_invariants_and_members():
    table = bk.make_bucket_resolutions((512, 512), 256, 1024, 64)
    for w, h in table:
        assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
    # hand-computed: h = floor(262144 / w / 64) * 64
    for pair in [(512, 512), (256, 1024), (320, 768), (384, 640), (448, 576), (704, 320), (832, 256)]:
        assert pair in table and pair[::-1] in table
    assert len(table) == len(set(table)) == 17


def test_select_bucket_closest_aspect_and_cover_size():
    table = bk.make_bucket_resolutions((512, 512), 256, 1024, 64)
    # aspect 2.0: closest bucket aspects are 2.2 (704x320) and 1.667 (640x384) -> 704x320;
    # 2.0 < 2.2 so the width is matched: scale 0.704 -> 704x352, then cropped to 704x320
    assert bk.select_bucket((1000, 500), table) == ((704, 320), (704, 352))
    assert bk.select_bucket((512, 512), table) == ((512, 512), (512, 512))
    assert bk.select_bucket((1024, 1024), table) == ((512, 512), (512, 512))


def test_no_upscale_bucket_hand_computed():
    # w' = sqrt(262144 * 2) = 724.08 -> 704 (h 320, aspect 2.2); h' = 362.04 -> 320 (w 640, aspect 2.0) wins
    assert bk.no_upscale_bucket((1000, 500), 512 * 512, 64) == ((640, 320), (640, 320))
    # small images are never enlarged, only cropped down to multiples of the step
    assert bk.no_upscale_bucket((300, 200), 512 * 512, 64) == ((256, 192), (300, 200))


def test_center_crop_box():
    assert bk.center_crop_box((704, 352), (704, 320)) == (0, 16, 704, 336)
