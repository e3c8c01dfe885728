import numpy as np
import pytest

from core.files import seeded
from pipeline.config import SynthesisConfig
from stages.extract.synthesis import (
    TextureSource,
    augment_texture,
    blend,
    combine_masks,
    feature_mask,
    foreground_mask,
    otsu_threshold,
    perlin_2d,
    perlin_mask,
    synthesize,
)


def test_perlin_shape_range_and_determinism():
    a = perlin_2d((224, 224), (4, 8), seeded(0, "x"))
    b = perlin_2d((224, 224), (4, 8), seeded(0, "x"))
    assert a.shape == (224, 224) and np.array_equal(a, b)
    assert -1.5 < a.min() < 0 < a.max() < 1.5
    # zero at lattice points (a property of gradient noise)
    assert np.allclose(a[::56, ::28], 0, atol=1e-6)


def test_combine_masks_three_rules():
    m1 = np.array([1, 1, 0, 0.0])
    m2 = np.array([1, 0, 1, 0.0])
    assert combine_masks(m1, m2, 0.9).tolist() == [1, 1, 1, 0]  # union
    assert combine_masks(m1, m2, 0.5).tolist() == [1, 0, 0, 0]  # intersection
    assert combine_masks(m1, m2, 0.1).tolist() == [1, 1, 0, 0]  # first alone


def test_feature_mask_any_pixel_rule():
    m = np.zeros((16, 16), np.float32)
    m[9, 2] = 1  # one pixel in cell (1, 0) at stride 8
    fm = feature_mask(m, 8)
    assert fm.tolist() == [[False, False], [True, False]]


def test_blend_is_eq3():
    x, tex, m = np.full((1, 2, 3), 0.2), np.full((1, 2, 3), 1.0), np.array([[1.0, 0.0]])
    out = blend(x, tex, m, beta=0.75)
    assert np.allclose(out[0, 0], 0.25 * 1.0 + 0.75 * 0.2)  # (1-beta) tex + beta x
    assert np.allclose(out[0, 1], 0.2)  # outside the mask: untouched


def test_otsu_and_foreground_of_dark_object_on_white():
    img = np.ones((64, 64, 3), np.float32)
    yy, xx = np.mgrid[0:64, 0:64]
    disk = (yy - 32) ** 2 + (xx - 32) ** 2 < 15**2
    img[disk] = 0.1
    fg = foreground_mask(img, is_texture=False)
    assert fg[32, 32] == 1 and fg[2, 2] == 0
    assert abs(fg.mean() - disk.mean()) < 0.03
    assert foreground_mask(img, is_texture=True).min() == 1
    assert 0.1 < otsu_threshold(img.mean(2)) < 1.0


def test_synthesize_deterministic_inside_foreground_and_beta_clipped():
    cfg = SynthesisConfig()
    img = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    fg = np.zeros((64, 64), np.float32)
    fg[16:48, 16:48] = 1
    tex = TextureSource("")
    a = synthesize(img, fg, tex, cfg, 8, seeded(3, "img", 0))
    b = synthesize(img, fg, tex, cfg, 8, seeded(3, "img", 0))
    c = synthesize(img, fg, tex, cfg, 8, seeded(3, "img", 1))
    assert np.array_equal(a.image, b.image) and a.beta == b.beta
    assert not np.array_equal(a.image, c.image)
    assert a.patch_mask.any() and a.used_foreground
    assert (a.mask * (1 - fg)).sum() == 0  # never outside the foreground
    changed = np.abs(a.image - img).sum(-1) > 1e-6
    assert not changed[a.mask == 0].any()
    assert cfg.beta_min <= a.beta <= cfg.beta_max


def test_empty_foreground_falls_back_to_whole_image():
    cfg = SynthesisConfig(max_tries=2)
    img = np.zeros((32, 32, 3), np.float32)
    out = synthesize(img, np.zeros((32, 32), np.float32), TextureSource(""), cfg, 8, seeded(0, "e"))
    assert not out.used_foreground and out.patch_mask.any()


def test_texture_folder_and_augmentations(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "t.jpg")
    src = TextureSource(str(tmp_path))
    im = src.draw(32, seeded(0, "t"))
    assert im.size == (32, 32)
    out = augment_texture(im, seeded(0, "aug"))
    assert out.size == (32, 32) and out.mode == "RGB"


@pytest.mark.parametrize("size", [224, 256])
def test_perlin_mask_binary(size):
    masks = np.stack([perlin_mask(size, SynthesisConfig(), seeded(i, size)) for i in range(20)])
    assert set(np.unique(masks)) == {0.0, 1.0}  # binary (one mask may be empty: GLASS draws again)
    cover = masks.mean((1, 2))
    assert (cover > 0).sum() >= 10 and (cover < 0.9).all() and 0.01 < cover.mean() < 0.5


@pytest.mark.parametrize("scar", [False, True])
def test_cut_paste_moves_a_piece_of_the_image_onto_the_foreground(scar):
    from stages.extract.synthesis import cut_paste

    rng = np.random.default_rng(3)
    image = rng.random((64, 64, 3)).astype(np.float32)
    fg = np.zeros((64, 64), np.float32)
    fg[16:48, 16:48] = 1
    out, mask = cut_paste(image, fg, np.random.default_rng(7), scar=scar)
    assert out.shape == image.shape and mask.dtype == np.uint8 and 0 < mask.sum() < 64 * 64 * 0.5
    assert np.array_equal(out[mask == 0], image[mask == 0])  # nothing changes outside the mask
    assert not np.allclose(out[mask == 1], image[mask == 1])  # the pasted piece is different
    ys, xs = np.nonzero(mask)
    cy, cx = int(ys.mean()), int(xs.mean())
    assert fg[cy - 2:cy + 3, cx - 2:cx + 3].any()  # centred on the foreground (within 2 px: rounding, rotation)
    far = np.zeros_like(fg)
    far[:8, :8] = 1  # a foreground in one corner pulls the piece there
    _, corner = cut_paste(image, far, np.random.default_rng(7), scar=scar)
    assert np.nonzero(corner)[0].mean() < 24 and np.nonzero(corner)[1].mean() < 24
    again, mask2 = cut_paste(image, fg, np.random.default_rng(7), scar=scar)
    assert np.array_equal(again, out) and np.array_equal(mask, mask2)  # a function of the generator


def test_feature_mask_uses_the_backbones_ceil_grid():
    m = np.zeros((300, 300), np.float32)  # 300 / 8 = 37.5: the backbone gives 38 x 38 features
    m[299, 296] = 1  # in the partial last cell
    fm = feature_mask(m, 8)
    assert fm.shape == (38, 38) and fm[37, 37] and fm.sum() == 1


def test_synthetic_rows_sit_where_the_mask_is_at_a_size_stride_does_not_divide(tiny_data):
    """At 300 px (not a multiple of stride 8) the anomaly rows of a synthetic
    image are exactly the 38 x 38 feature cells its pixel mask touches."""
    from dataclasses import replace

    import torch

    from pipeline.config import Config, DataConfig, FeatureConfig
    from stages.extract.plan import make_plan
    from stages.extract.shards import ShardExtractor

    cfg = Config(data=DataConfig(root=str(tiny_data)), features=FeatureConfig(resize=300, crop=0),
                 synthesis=SynthesisConfig(variants=1))
    plan = make_plan(cfg)
    ex = ShardExtractor(cfg, torch.device("cpu"))
    task = plan.task("train", 0)
    sample = task.samples[0]
    prep = ex.prepare(replace(task, samples=[sample]))
    arrays = ex.compute(prep)
    normal = arrays["anomaly"] == 0
    assert normal.sum() == 38 * 38
    img = prep.images[0]
    syn = synthesize(img, ex._foreground(sample, img), ex.textures, cfg.synthesis, 8,
                     seeded(cfg.synthesis.seed, sample.image_id, 0))
    cells = {(y, x) for y in range(38) for x in range(38) if syn.mask[8 * y:8 * y + 8, 8 * x:8 * x + 8].any()}
    got = {tuple(int(v) for v in yx) for yx in arrays["yx"][~normal]}
    assert got == cells
    assert (arrays["pair"][~normal] == np.array([38 * y + x for y, x in arrays["yx"][~normal]])).all()
