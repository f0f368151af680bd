"""Base models that are not there (or not SDXL, gated, unreachable) are named in one line, without Hub retries."""

from pathlib import Path

import pytest

from bilora_diffusion import hub
from bilora_diffusion.hub import BaseModelError, resolve_base_model
from bilora_diffusion.options import OptionError
from bilora_diffusion.sdxl.options import TOY_MODEL


def test_each_base_model_problem_is_named(tmp_path, tiny_sdxl_dir):
    assert resolve_base_model(tiny_sdxl_dir) == tiny_sdxl_dir
    assert resolve_base_model(TOY_MODEL) == TOY_MODEL
    cases = {
        str(tmp_path / "no-such-model"): "no such folder",
        "./no-such-dir": "no such folder",
        str(not_sdxl_folder(tmp_path / "sd15")): "not an SDXL model",
        str(tmp_path): "not an SDXL model folder (no model_index.json)",
        "nobody-here/no-such-sdxl": "not in the local Hugging Face cache, and the Hub is unreachable "
        "(HF_HUB_OFFLINE=1)",
        "no-such-bare-name": "no such folder; as a Hub id it is not in the local Hugging Face cache",
    }
    for name, why in cases.items():
        with pytest.raises(BaseModelError) as err:
            resolve_base_model(name)
        message = str(err.value)
        assert message.startswith(f"--pretrained_model_name_or_path {name}: ") and why in message, message
        assert "\n" not in message and isinstance(err.value, OptionError)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(BaseModelError, match="not a folder"):
        resolve_base_model(tmp_path / "a_file")
    with pytest.raises(BaseModelError, match="--model .*: not a model folder \\(no config.json\\)"):
        resolve_base_model(tmp_path, "causal-lm", flag="--model")


def _http_error(cls, message: str):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


def test_hub_answers_gated_missing_and_not_sdxl(monkeypatch):
    from huggingface_hub import errors

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_unreachable", lambda timeout=5.0: None)
    answers = {
        errors.GatedRepoError: "a gated repository; accept its license at https://huggingface.co/org/model",
        errors.RepositoryNotFoundError: "no such repository on the Hub",
        errors.RemoteEntryNotFoundError: "not an SDXL model (the repository has no model_index.json)",
    }
    for cls, why in answers.items():

        def download(*args, _cls=cls, **kwargs):
            raise _http_error(_cls, "401 Client Error")

        monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
        with pytest.raises(BaseModelError) as err:
            resolve_base_model("org/model")
        assert why in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    """No HF_HUB_OFFLINE, no network (here: a port nobody listens on): one line at once, not huggingface_hub's
    five retries over half a minute."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.monotonic()
    with pytest.raises(
        BaseModelError, match="not in the local Hugging Face cache, and the Hub is unreachable"
    ):
        resolve_base_model("nobody-here/no-such-sdxl")
    assert time.monotonic() - start < 10


def not_sdxl_folder(root: Path) -> Path:
    """A diffusers folder of an SD 1.5-style pipeline: model_index.json and unet/, but one text encoder."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], '
        '"text_encoder": ["transformers", "CLIPTextModel"]}'
    )
    (root / "unet").mkdir()
    return root
