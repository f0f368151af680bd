"""SDXL specifics: components, sample geometry, caches, loss, the training loop, validation samples, loss
landscapes, LoRA export (export/) and stock-pipeline inference (generate.py)."""

from __future__ import annotations


def main(argv: list[str] | None = None):
    """Entry point of train_sdxl.py: bad options exit with code 2 before any model loads."""
    import logging

    from ..options import run_cli
    from .options import SDXLOptions
    from .train import train

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_cli(train, SDXLOptions, argv)
