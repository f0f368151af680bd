"""The tiny-model builders of `bilora_diffusion.testing`: the toy tokenizer and the toy SDXL's structure."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the shipped model must load with no network

from pathlib import Path

from bilora_diffusion.toy import world


def test_toy_tokenizer_has_one_token_per_word(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    from bilora_diffusion.testing import build_toy_tokenizer

    build_toy_tokenizer().save_pretrained(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    caption = world.make_sample(3)[1]
    ids = tokenizer(caption).input_ids
    assert len(ids) == len(caption.replace(",", " ,").split()) + 2  # + BOS and EOS
    assert tokenizer.model_max_length == 77


def test_built_components_have_sdxl_structure() -> None:
    from diffusers import StableDiffusionXLPipeline

    from bilora_diffusion.testing import build_toy_components

    parts = build_toy_components()
    unet = parts["unet"]
    assert [type(b).__name__ for b in unet.down_blocks] == [
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    ]
    assert [type(b).__name__ for b in unet.up_blocks] == [
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "UpBlock2D",
    ]
    assert unet.config.addition_embed_type == "text_time"
    te1, te2 = parts["text_encoder"].config.hidden_size, parts["text_encoder_2"].config.hidden_size
    assert unet.config.cross_attention_dim == te1 + te2
    assert unet.config.projection_class_embeddings_input_dim == (
        6 * unet.config.addition_time_embed_dim + parts["text_encoder_2"].config.projection_dim
    )
    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules() if ".attn" in n}
    assert {"to_q", "to_k", "to_v"} <= names
    assert any(n.endswith("to_out.0") for n, _ in unet.named_modules())
    pipe = StableDiffusionXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a small red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
