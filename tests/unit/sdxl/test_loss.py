"""SDXL loss and conditioning pieces against hand computations."""

import pytest
import torch
from diffusers import DDPMScheduler

from bilora_diffusion.sdxl.loss import denoising_loss, prediction_target
from bilora_diffusion.sdxl.models import encode_prompt, tokenize


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )


def test_min_snr_weights_for_epsilon_and_v_prediction():
    sched = scheduler()
    t = torch.tensor([10, 500, 990])
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    alphas = sched.alphas_cumprod[t]
    snr = alphas / (1 - alphas)  # SNR(t) = alpha_bar / (1 - alpha_bar)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    gamma = 5.0
    eps = denoising_loss(pred, target, sched, t, gamma, "epsilon")
    torch.testing.assert_close(eps, (per_sample * torch.clamp(snr, max=gamma) / snr).mean())
    v = denoising_loss(pred, target, sched, t, gamma, "v_prediction")
    torch.testing.assert_close(v, (per_sample * torch.clamp(snr, max=gamma) / (snr + 1)).mean())
    plain = denoising_loss(pred, target, sched, t, None, "epsilon")
    torch.testing.assert_close(plain, ((pred - target) ** 2).mean())


def test_v_prediction_target():
    sched = scheduler()
    t = torch.tensor([3, 700])
    x0, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(prediction_target(sched, x0, noise, t, "v_prediction"), a * noise - s * x0)
    assert prediction_target(sched, x0, noise, t, "epsilon") is noise


def test_encode_prompt_concatenates_penultimate_states_and_pools_encoder_2(tiny_sdxl):
    te1, te2 = tiny_sdxl["text_encoder"], tiny_sdxl["text_encoder_2"]
    ids = tokenize([tiny_sdxl["tokenizer"], tiny_sdxl["tokenizer_2"]], ["a red square", "blue"])
    embeds, pooled = encode_prompt([te1, te2], ids)
    h1 = te1(ids[0], output_hidden_states=True).hidden_states[-2]
    out2 = te2(ids[1], output_hidden_states=True)
    torch.testing.assert_close(embeds, torch.cat([h1, out2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(pooled, out2.text_embeds)
    assert embeds.shape == (2, 77, te1.config.hidden_size + te2.config.hidden_size)


# -- SampleGeometry ---------------------------------------------------------------------------------------------
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


# -- latent cache -----------------------------------------------------------------------------------------------
def _counting(vae):
    calls = []
    encode = vae.encode

    def counted(pixels, *args, **kwargs):
        calls.append(pixels.shape[0])
        return encode(pixels, *args, **kwargs)

    vae.encode = counted
    return calls


def test_latent_cache_reused_after_a_record_is_removed_hits_every_remaining_record(tiny_sdxl, tmp_path):
    from bilora_diffusion.data import load_records
    from bilora_diffusion.sdxl.cache import LatentCache
    from bilora_diffusion.sdxl.geometry import plan_geometry
    from bilora_diffusion.sdxl.models import vae_scale_factor
    from bilora_diffusion.testing import make_image_folder

    vae = tiny_sdxl["vae"]
    calls = _counting(vae)
    factor = vae_scale_factor(vae)
    folder = make_image_folder(tmp_path / "data", n=5, size=(48, 32))

    def build(cache):
        records = load_records(str(folder)).records
        geometry = plan_geometry([r.size for r in records], [(32, 32)] * len(records), factor)
        cache.build(records, geometry, True, vae, "cpu", torch.float32)
        return {r.key: (cache.get(r, g, False), cache.get(r, g, True)) for r, g in zip(records, geometry)}

    first = build(LatentCache("vae-id", str(tmp_path / "cache")))
    assert len(calls) == 10  # 5 images x 2 flips
    (folder / "img_001.png").unlink()  # the dataset loses its second record: every later record moves up
    (folder / "img_001.txt").unlink()
    calls.clear()
    again = LatentCache("vae-id", str(tmp_path / "cache"))
    second = build(again)
    assert calls == [] and (again.hits, again.misses) == (8, 0)
    assert second.keys() == first.keys() - {str(folder / "img_001.png")}
    for key, (plain, flipped) in second.items():  # each record found its own latents, not its old neighbour's
        assert torch.equal(plain, first[key][0]) and torch.equal(flipped, first[key][1])
    # in memory (no --cache_dir): rebuilding the same cache for the smaller set encodes nothing
    memory = LatentCache("vae-id", None)
    build(memory)
    calls.clear()
    (folder / "img_003.png").unlink()
    build(memory)
    assert calls == [] and memory.hits == 6
    # another VAE identity is another entry
    other = LatentCache("other-vae", str(tmp_path / "cache"))
    build(other)
    assert len(calls) == 6 and other.misses == 6


# -- validation samples -----------------------------------------------------------------------------------------
def test_validation_render_conditions_the_unet_on_the_settings_geometry(tiny_sdxl):
    from diffusers import DDPMScheduler

    from bilora_diffusion.sdxl.geometry import SampleGeometry
    from bilora_diffusion.sdxl.models import SDXLComponents, vae_scale_factor
    from bilora_diffusion.sdxl.sampling import SampleSettings, build_pipeline, render

    parts = {k: v for k, v in tiny_sdxl.items() if k != "scheduler"}
    components = SDXLComponents(
        **parts, noise_scheduler=DDPMScheduler.from_config(tiny_sdxl["scheduler"].config)
    )
    seen = []
    unet_forward = components.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].tolist())
        return unet_forward(*args, **kwargs)

    components.unet.forward = spy
    geometry = SampleGeometry.full_frame(64, 32, vae_scale_factor(components.vae))
    settings = SampleSettings(["a red square"], 1, seed=0, steps=1, guidance_scale=2.0, geometry=geometry)
    (row,) = render(build_pipeline(components, "cpu"), settings)
    assert row[0].size == (64, 32)
    # [original h, original w, crop top, crop left, target h, target w], for the unconditional and the prompt row
    assert seen == [[[32, 64, 0, 0, 32, 64]] * 2]
