"""Validation sampling conditions the UNet on the settings' geometry."""

from diffusers import DDPMScheduler


def test_validation_render_conditions_the_unet_on_the_settings_geometry(tiny_sdxl):

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
