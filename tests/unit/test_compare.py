"""The paper's metric (CLIP I2T / I2I) and bilora-compare, offline on a tiny random CLIP and a tiny SDXL."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from bilora_diffusion import compare, scoring
from bilora_diffusion.options import OptionError
from bilora_diffusion.testing import make_image_folder


def test_clip_scores_equal_a_hand_computation_on_fixed_embeddings():
    img = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    txt = torch.tensor([[3.0, 4.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    # cos: 1, -1 (clamped at 0), 2/(2*sqrt(2)) = 1/sqrt(2)
    assert scoring.clip_i2t(img, txt) == pytest.approx([100.0, 0.0, 100 / math.sqrt(2)])
    refs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # image 0: cos 0.6 and 0.8 -> 0.7; image 1: 1 and 0 -> 0.5; image 2: 0 and 1 -> 0.5
    assert scoring.mean_cosine(img, refs) == pytest.approx([0.7, 0.5, 0.5])


def test_scorer_matches_the_formula_on_the_models_own_embeddings(tiny_clip_dir):
    scorer = scoring.ClipScorer(tiny_clip_dir)
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    prompts = ["a red square", "a blue circle"]
    scorer.set_references([Image.new("RGB", (40, 40), "green")])
    got = scorer.score(images, prompts)
    e_img, e_txt = scorer.image_embeds(images), scorer.text_embeds(prompts)
    cos = torch.nn.functional.cosine_similarity(e_img, e_txt)
    assert got["clip_i2t"] == pytest.approx([100 * max(float(c), 0.0) for c in cos], abs=1e-4)
    ref = scorer.image_embeds([Image.new("RGB", (40, 40), "green")])
    assert got["clip_i2i"] == pytest.approx(
        [float(c) for c in torch.nn.functional.cosine_similarity(e_img, ref)], abs=1e-5
    )


def test_dino_i2i_is_the_mean_cosine_of_cls_embeddings(tiny_clip_dir, tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    dino = tmp_path / "dino"
    vit = ViTConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    vit.update(dict(image_size=32, patch_size=8))
    ViTModel(vit, add_pooling_layer=False).save_pretrained(dino)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino)
    scorer = scoring.ClipScorer(tiny_clip_dir, str(dino))
    refs = [Image.new("RGB", (40, 40), c) for c in ("green", "white")]
    scorer.set_references(refs)
    images = [Image.new("RGB", (40, 40), "red")]
    got = scorer.score(images, ["a red square"])["dino_i2i"]
    e, r = scorer.dino_embeds(images), scorer.dino_embeds(refs)
    cos = torch.nn.functional.cosine_similarity(e, r)
    assert got == pytest.approx([float(cos.mean())], abs=1e-5)


def test_bilora_score_scores_a_folder_and_a_missing_model_fails_in_one_line(tiny_clip_dir, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "imgs", n=3)
    result = scoring.main(
        ["--images", str(folder), "--clip_model", tiny_clip_dir, "--output", str(tmp_path / "s.json")]
    )
    assert len(result["scores"]["clip_i2t"]) == 3 and result["prompts"][0].startswith("a ")
    assert json.loads((tmp_path / "s.json").read_text())["mean"] == result["mean"]
    with pytest.raises(SystemExit) as err:
        scoring.main(["--images", str(folder), "--prompt", "x", "--clip_model", str(tmp_path / "nope")])
    assert err.value.code == 2 and "--clip_model" in capsys.readouterr().err


def test_missing_clip_model_stops_the_trainer_before_models_load(tiny_sdxl_dir, image_folder, tmp_path):
    from bilora_diffusion.sdxl.train import SDXLTrainer
    from tests.e2e.test_train_sdxl import options

    opts = options(
        tiny_sdxl_dir,
        image_folder,
        tmp_path / "o",
        validation_prompt="a red square",
        validation_clip_model=str(tmp_path / "missing"),
    )
    trainer = SDXLTrainer(opts)
    with pytest.raises(OptionError, match="--validation_clip_model .*no such folder"):
        trainer.setup()
    with pytest.raises(OptionError, match="--validation_prompt"):
        options(tiny_sdxl_dir, image_folder, tmp_path / "o", validation_clip_model="x")


def test_variants_parse(capsys):
    vs = compare.parse_variants(["lora,bilora", "bilora:rho=0.25:aux_lr=0.01"])
    assert [v.method for v in vs] == ["lora", "bilora", "bilora"]
    assert vs[2].overrides == {"rho": "0.25", "aux_lr": "0.01"} and "=" not in vs[2].slug
    with pytest.raises(OptionError):
        compare.parse_variants(["lora,lora"])
    assert compare.parse_shard("1/3") == (1, 3)
    with pytest.raises(OptionError):
        compare.parse_shard("3/3")
    with pytest.raises(SystemExit) as err:
        compare.main(["--methods", "lora", "--seed", "3"])  # set per run by the compare: exit 2, one line
    assert err.value.code == 2 and "--seed is set by bilora-compare per run" in capsys.readouterr().err


def test_verdict_says_within_noise_and_better():
    summary = {"lora": {"heldout_loss": [0.10, 0.01, 3]}, "bilora": {"heldout_loss": [0.099, 0.01, 3]}}
    (v,) = compare.verdicts(summary)
    assert v["call"] == "within noise"
    assert "no measurable difference" in compare.verdict_text([v], 3)[0]
    summary["bilora"]["heldout_loss"] = [0.05, 0.001, 3]
    (v,) = compare.verdicts(summary)
    assert v["call"] == "better" and v["t"] < -2


def test_paper_compare_preset_opens_with_its_command_and_parses_for_every_method():
    path = Path(__file__).resolve().parents[2] / "configs" / "sdxl_paper_compare.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# bilora-compare --config configs/sdxl_paper_compare.yaml")
    args = ["--config", str(path), "--dataset", ".", "--methods", "lora,bilora", "--validation_split", "0.2"]
    args += ["--validation_clip_model", "openai/clip-vit-large-patch14"]
    s = compare.settings_from(*compare.parse_args(args))
    opts = [compare.trainer_options(s, v, 0) for v in s.variants]
    assert [o.method for o in opts] == ["lora", "bilora"] and all(o.validation_prompt for o in opts)
    assert opts[1].rho == 0.05 and opts[0].output_dir != opts[1].output_dir
