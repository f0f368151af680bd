"""Options of train_sdxl.py: diffusers' SDXL LoRA flag names and meanings, plus the Bi-LoRA ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..hub import SDXL_BASE
from ..options import OptionError, TrainOptions, opt

TOY_MODEL = str(Path(__file__).resolve().parent.parent / "toy" / "sdxl-tiny")
"""The embedded toy model: a tiny SDXL-architecture model shipped in the package (runs offline on a CPU). The
no-argument demo (configs/demo.yaml) names it; pass it as --pretrained_model_name_or_path to use it elsewhere."""

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


USAGE = """usage: python train_sdxl.py [--config FILE.yaml] [--name value ...]
       accelerate launch [accelerate options] train_sdxl.py [--config FILE.yaml] [--name value ...]

With no arguments, train_sdxl.py runs the embedded demo (configs/demo.yaml): the tiny SDXL-architecture model
shipped in the package learns a new concept from 24 shipped pictures, offline, on a CPU, in a few minutes.
With any argument, the base model is --pretrained_model_name_or_path (default: stabilityai/stable-diffusion-xl-
base-1.0) and --dataset is required. A bad option exits with status 2 and one line naming it."""


@dataclass
class SDXLOptions(TrainOptions):
    """Options of the SDXL trainer."""

    usage = USAGE  # not a field: printed first by --help

    pretrained_model_name_or_path: str = opt(
        SDXL_BASE,
        "Base SDXL model: Hub id or local diffusers folder. The embedded toy model (what the no-argument demo "
        "trains) is bilora_diffusion/toy/sdxl-tiny.",
        path=True,
    )
    pretrained_vae_model_name_or_path: str | None = opt(
        None, "A VAE to use instead of the base model's (e.g. madebyollin/sdxl-vae-fp16-fix).", path=True
    )
    revision: str | None = opt(None, "Revision of the base model on the Hub.")
    variant: str | None = opt(None, "Weights variant of the base model, e.g. fp16.")
    dataset: str | None = opt(
        None,
        "Local folder (kohya captions, metadata.jsonl/csv, save_to_disk) or a Hub dataset id.",
        path=True,
    )
    dataset_name: str | None = opt(
        None, "Hub dataset id or local dataset folder (diffusers' flag).", path=True
    )
    dataset_config_name: str | None = opt(None, "Config name of the Hub dataset.")
    train_data_dir: str | None = opt(None, "Local folder of training images (diffusers' flag).", path=True)
    image_column: str = opt("image", "Image column of a datasets dataset.")
    caption_column: str = opt("text", "Caption column of a datasets dataset.")
    caption_extension: str = opt(".txt", "Extension of kohya-style caption files next to the images.")
    instance_prompt: str | None = opt(None, "DreamBooth: the caption of every image without a caption file.")
    caption_dropout: float = opt(0.0, "Probability of training a sample with an empty prompt (enables CFG).")
    resolution: int = opt(1024, "Training resolution (side of the square, or the bucket area's side).")
    center_crop: bool = opt(False, "Center crop instead of a random crop (decided per sample per step).")
    random_flip: bool = opt(False, "Flip horizontally with probability 1/2 (per sample per step).")
    bucketing: bool = opt(False, "Aspect-ratio bucketing: buckets of about resolution^2 pixels, sides of 64.")
    max_upscale: float = opt(2.0, "Largest upscale allowed to reach a bucket; smaller images are skipped.")
    cache_dir: str | None = opt(None, "Disk cache of VAE latents / text embeddings (reused by later runs).")
    validation_split: float = opt(0.0, "Fraction of images held out for a fixed-noise validation loss.")
    on_bad_image: str = opt(
        "skip", "A bad image found by the pre-flight scan: skip it or stop.", choices=("skip", "error")
    )
    snr_gamma: float | None = opt(None, "Min-SNR weighting gamma (5.0 recommended).")
    noise_offset: float = opt(0.0, "Noise offset.")
    prediction_type: str | None = opt(
        None, "epsilon or v_prediction; None = the scheduler's.", choices=("epsilon", "v_prediction")
    )
    validation_prompt: list[str] = opt([], "Prompt(s) sampled at step 0 and every validation_steps.")
    num_validation_images: int = opt(4, "Images per validation prompt (fixed seeds).")
    validation_inference_steps: int = opt(25, "Denoising steps of the validation samples.")
    validation_guidance_scale: float = opt(5.0, "Guidance scale of the validation samples.")
    train_text_encoder: bool = opt(False, "Also train LoRA on both text encoders' attention projections.")
    text_encoder_lr: float | None = opt(
        None, "Learning rate of the text encoders' LoRA; None = learning_rate."
    )
    target_modules: list[str] = opt(list(UNET_TARGETS), "UNet modules to adapt.")
    text_encoder_target_modules: list[str] = opt(list(TEXT_ENCODER_TARGETS), "Text-encoder modules to adapt.")
    enable_xformers_memory_efficient_attention: bool = opt(False, "Use xformers attention (if installed).")
    output_name: str = opt("bilora_sdxl", "File name (without .safetensors) of the kohya-format LoRA.")
    export_format: str = opt("both", "LoRA files written at the end.", choices=("diffusers", "kohya", "both"))
    save_dtype: str = opt("fp32", "Precision of the exported LoRA files.", choices=("fp32", "fp16", "bf16"))
    compare_grid: bool = opt(True, "At the end, write samples/before_after.png (without / with the LoRA).")

    def validate(self) -> None:
        super().validate()
        if not (self.dataset or self.dataset_name or self.train_data_dir):
            raise OptionError("no data: pass --dataset (a folder or a Hub dataset id)")
        if self.train_data_dir and not Path(self.train_data_dir).is_dir():
            raise OptionError(f"--train_data_dir: no such folder {self.train_data_dir}")
        if self.resolution < 16 or self.resolution % 8:
            raise OptionError(f"--resolution must be a multiple of 8 and >= 16, got {self.resolution}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise OptionError(f"--caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.validation_split < 1.0:
            raise OptionError(f"--validation_split must be in [0, 1), got {self.validation_split}")
        if self.max_upscale < 1.0:
            raise OptionError(f"--max_upscale must be >= 1, got {self.max_upscale}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise OptionError(f"--snr_gamma must be > 0, got {self.snr_gamma}")
        if self.num_validation_images < 1:
            raise OptionError("--num_validation_images must be >= 1")
        if self.text_encoder_lr is not None and self.text_encoder_lr <= 0:
            raise OptionError(f"--text_encoder_lr must be > 0, got {self.text_encoder_lr}")
