"""SampleGeometry (resize, crop, flip, micro-conditioning) against hand computations and the pipeline's defaults."""

import pytest
import torch


def test_geometry_of_a_wide_image_in_a_non_square_bucket_hand_computed():
    from bilora_diffusion.sdxl.geometry import SampleGeometry

    # 400x100 into the 192x64 bucket: the height is the relatively shorter side (64/100 > 192/400), so the image
    # is resized to 256x64; the latent (factor 8) is 32x8 and the bucket 24x8, leaving 8 latent columns.
    g = SampleGeometry((400, 100), (192, 64), 8)
    assert g.resized == (256, 64)
    assert g.crop_box(center=True) == (0, 32)
    assert g.time_ids(*g.crop_box(center=True)) == [100, 400, 0, 32, 64, 192]
    latent = torch.arange(4 * 8 * 32, dtype=torch.float32).reshape(4, 8, 32)
    crop, ids = g.crop(latent, center=True)
    assert torch.equal(crop, latent[:, :, 4:28]) and ids == [100, 400, 0, 32, 64, 192]
    # random crops: the left offset on the 8-px grid, from 0 to 64 px; the top has no room
    lefts = set()
    for seed in range(60):
        crop, ids = g.crop(latent, center=False, generator=torch.Generator().manual_seed(seed))
        top, left = ids[2], ids[3]
        assert top == 0 and left % 8 == 0 and torch.equal(crop, latent[:, :, left // 8 : left // 8 + 24])
        assert ids[:2] == [100, 400] and ids[4:] == [64, 192]
        lefts.add(left)
    assert lefts == {0, 8, 16, 24, 32, 40, 48, 56, 64}
    # a tall one: 80x160 into 64x192: resized 96x192, centre crop 16 px from the left
    tall = SampleGeometry((80, 160), (64, 192), 8)
    assert tall.resized == (96, 192)
    assert tall.time_ids(*tall.crop_box(center=True)) == [160, 80, 0, 16, 192, 64]
    # a latent of another size is refused
    with pytest.raises(ValueError, match="not of the resized image"):
        g.crop(torch.zeros(4, 8, 24), center=True)


def test_geometry_flip_mirrors_the_pixels_and_keeps_the_time_ids():
    from PIL import Image

    from bilora_diffusion.sdxl.geometry import SampleGeometry

    g = SampleGeometry((40, 20), (24, 8), 4)
    assert g.resized == (24, 12)  # 24/40 = 0.6 >= 8/20 = 0.4: the width matches the bucket, height 12
    image = Image.new("RGB", (40, 20))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # a red band on the left
    plain, flipped = g.pixels(image, flip=False), g.pixels(image, flip=True)
    assert plain.shape == (3, 12, 24)
    assert torch.equal(flipped, plain.flip(-1))
    assert plain[0, :, 0].min() == 1.0 and flipped[0, :, -1].min() == 1.0  # red moved to the right
    # crop offsets are drawn the same with and without flip (diffusers flips before cropping: the offsets and
    # time ids are in the flipped frame), so the time ids of a sample do not depend on its flip
    latent = torch.randn(4, 3, 6)
    a = g.crop(latent, False, torch.Generator().manual_seed(3))
    b = g.crop(latent.flip(-1), False, torch.Generator().manual_seed(3))
    assert a[1] == b[1]
    top = a[1][2] // 4
    assert torch.equal(b[0], latent.flip(-1)[:, top : top + 2, :])


def test_full_frame_geometry_is_the_pipelines_default_micro_conditioning():
    from bilora_diffusion.sdxl.geometry import SampleGeometry

    assert SampleGeometry.full_frame(64, 48).pipeline_kwargs() == {
        "height": 48,
        "width": 64,
        "original_size": (48, 64),
        "crops_coords_top_left": (0, 0),
        "target_size": (48, 64),
    }
