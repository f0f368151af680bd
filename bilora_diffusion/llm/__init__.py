"""Causal-LM specifics: instruction data with response-only labels, the trainer, PEFT export, evaluation."""

from __future__ import annotations


def main(argv: list[str] | None = None):
    """Entry point of train_llm.py: bad options or data exit with code 2 before any model weight loads."""
    import logging

    from ..options import run_cli
    from .options import LLMOptions
    from .train import train

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_cli(train, LLMOptions, argv)
