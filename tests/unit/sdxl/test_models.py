"""SDXL prompt encoding against the pipeline's: penultimate states concatenated, pooled from encoder 2."""

import torch

from bilora_diffusion.sdxl.models import encode_prompt, tokenize


def test_encode_prompt_concatenates_penultimate_states_and_pools_encoder_2(tiny_sdxl):
    te1, te2 = tiny_sdxl["text_encoder"], tiny_sdxl["text_encoder_2"]
    ids = tokenize([tiny_sdxl["tokenizer"], tiny_sdxl["tokenizer_2"]], ["a red square", "blue"])
    embeds, pooled = encode_prompt([te1, te2], ids)
    h1 = te1(ids[0], output_hidden_states=True).hidden_states[-2]
    out2 = te2(ids[1], output_hidden_states=True)
    torch.testing.assert_close(embeds, torch.cat([h1, out2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(pooled, out2.text_embeds)
    assert embeds.shape == (2, 77, te1.config.hidden_size + te2.config.hidden_size)
