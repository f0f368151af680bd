"""Export end to end against stock diffusers: every UNet module kind reloads through ``load_lora_weights``, and ``--fuse``
equals the LoRA-loaded pipeline."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from bilora_diffusion.sdxl.export import (
    export_from_folder,
    export_lora,
)
from tests.unit.sdxl.test_export import (
    _adapted_paths,
    images,
    loaded,
    merged,
    models_of,
    pipeline,
    trained,
    training_output,
)

# Every LoRA-able UNet module kind: attention, feed-forward, stack projections, resnets, samplers, conv_in/out
# (not the time/label embeddings, which the export refuses on purpose).
ALL_UNET_TARGETS = (
    r"(?!time_embedding|add_embedding).*\.(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2"
    r"|conv1|conv2|conv_shortcut|time_emb_proj|conv)|conv_in|conv_out"
)


@pytest.mark.slow
def test_every_unet_module_kind_reloads_through_stock_diffusers(tmp_path: Path) -> None:
    """Resnets, samplers, conv_in/out, stack projections and feed-forwards too, on the real SDXL topology: both
    files reload in stock diffusers to the hand-merged UNet (this also covers the diffusers file's key
    spelling, which diffusers' own converter leaves mixed for such a target set, and its loader then drops
    part of)."""
    comps, base, configs = trained("sdxl", text_encoders=False, unet_targets=ALL_UNET_TARGETS, std=0.02)
    kinds = {path.split(".")[-1] for path in _adapted_paths(comps["unet"])}
    assert {"to_q", "2", "proj_in", "conv1", "conv_shortcut", "time_emb_proj", "conv", "conv_in"} <= kinds
    written = export_lora(tmp_path, models_of(comps, configs), configs)
    reference = merged(base, comps, configs)["unet"]
    inputs = dict(
        sample=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        timestep=10,
        encoder_hidden_states=torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(1)),
        added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)},
    )
    with torch.no_grad():
        want = reference(**inputs).sample
        for file in written:
            torch.testing.assert_close(loaded(base, file).unet(**inputs).sample, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_fuse_equals_the_lora_loaded_pipeline(tmp_path: Path, tiny_sdxl_dir: str) -> None:
    from diffusers import StableDiffusionXLPipeline

    training_output(tmp_path / "run", tiny_sdxl_dir)
    written = export_from_folder(tmp_path / "run", tmp_path / "out", format="kohya", fuse=True)
    assert [p.name for p in written] == ["icons.safetensors", "fused"]
    fused = StableDiffusionXLPipeline.from_pretrained(written[1])
    fused.set_progress_bar_config(disable=True)
    assert not any("lora" in k for k in fused.unet.state_dict()), "LoRA layers left in the fused UNet"
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir).components
    with_lora = images(loaded(base, written[0]))
    np.testing.assert_allclose(images(fused), with_lora, atol=1e-4)
    assert np.abs(with_lora - images(pipeline(copy.deepcopy(base)))).max() > 1e-2
