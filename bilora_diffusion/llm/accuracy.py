"""Before → after: held-out exact-match accuracy of the base model and of base + LoRA, at the end of a run.

With ``--eval_accuracy``, the trainer answers every ``--eval_dataset`` question greedily twice — with the
adapters disabled (the base model, what the run started from) and with the primary LoRA (the auxiliary
branch off: what users take away) — and scores both with the evaluator's rules
(`bilora_diffusion.llm.evaluate`: the number after "####" or "The answer is", compared by value). It logs
one line with both numbers and an example, and writes ``accuracy.json`` (summaries) and
``accuracy_predictions.jsonl`` (every question, both answers) to the output folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .data import PromptFormat, prompt_ids, reference_text
from .evaluate import Score, generate, score

logger = logging.getLogger(__name__)

ACCURACY_FILE = "accuracy.json"
PREDICTIONS_FILE = "accuracy_predictions.jsonl"


def answer_all(model, tokenizer, rows: list[dict], fmt: PromptFormat, max_new_tokens: int, batch: int):
    prompts = [prompt_ids(row, fmt, tokenizer) for row in rows]
    was_training = model.training
    model.eval()
    try:
        return generate(model, tokenizer, prompts, max_new_tokens, batch)
    finally:
        model.train(was_training)


def before_after(
    model,
    tokenizer,
    rows: list[dict],
    fmt: PromptFormat,
    output_dir: Path,
    max_new_tokens: int = 32,
    batch: int = 16,
) -> tuple[Score, Score]:
    """Score the base model (adapters disabled) and base + primary LoRA on ``rows``; log and write both."""
    from .. import adapters_disabled, aux_disabled

    references = [reference_text(row, fmt) for row in rows]
    with adapters_disabled(model):
        base = answer_all(model, tokenizer, rows, fmt, max_new_tokens, batch)
    with aux_disabled(model):
        tuned = answer_all(model, tokenizer, rows, fmt, max_new_tokens, batch)
    before, after = score(base, references), score(tuned, references)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / ACCURACY_FILE).write_text(
        json.dumps({"before": before.summary(), "after": after.summary()}, indent=2) + "\n"
    )
    with (output_dir / PREDICTIONS_FILE).open("w", encoding="utf-8") as f:
        for row, ref, b, a in zip(rows, references, before.records, after.records):
            question = row.get(fmt.prompt_field, row.get(fmt.messages_field))
            f.write(
                json.dumps(
                    {
                        "question": question,
                        "reference": ref,
                        "before": b["prediction"],
                        "after": a["prediction"],
                    }
                )
                + "\n"
            )
    logger.info(
        "held-out accuracy (%d questions, exact match of the final number): %.0f%% without the LoRA -> "
        "%.0f%% with it (%s)",
        after.total,
        100 * before.accuracy,
        100 * after.accuracy,
        output_dir / ACCURACY_FILE,
    )
    example = next((k for k, r in enumerate(after.records) if r["correct"]), 0)
    question = rows[example].get(fmt.prompt_field)
    if isinstance(question, str):
        logger.info(
            "e.g. %r: without %r, with %r (reference %s)",
            question,
            before.records[example]["prediction"].strip(),
            after.records[example]["prediction"].strip(),
            after.records[example]["reference"],
        )
    return before, after
