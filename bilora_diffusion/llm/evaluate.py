"""GSM8K-style exact match: greedy generation from a base model + PEFT adapter, scored on the final number.

    python -m bilora_diffusion.llm.evaluate --adapter OUTPUT_DIR --data gsm8k_test.jsonl [--model BASE]

The reference is the number after a reference marker in the answer column ("####", GSM8K's format, or
MetaMath's "The answer is"; --reference_markers), or the whole answer when it is a bare number; the
prediction's answer is the number after the first answer marker in the generated text (the same two by
default; --markers). The two lists are separate: changing what a model writes does not change the data. Numbers compare by value: "1,234", "$1234.00" and "1234."
are equal. Prompts are rendered as in training: unless given, the template comes from the
``training_config.yaml`` next to the adapter and the base model from its ``adapter_config.json``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
import yaml

from ..errors import DataError
from ..options import OptionError, check_choices, opt, run_cli
from .data import prompt_ids, read_rows, reference_text
from .export import ADAPTER_CONFIG
from .options import FormatOptions
from .sources import check_data, check_model, check_tokenizer

logger = logging.getLogger(__name__)

MARKERS = ["####", "The answer is"]
"""Default answer markers of predictions and of references (GSM8K's "####", MetaMath's "The answer is")."""
_NUMBER = re.compile(r"[-+−]?\s*\$?\s*[-+−]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- parsing and scoring ------------------------------------------------------------------------------------
def parse_number(text: str) -> Decimal | None:
    """The first number in ``text``, as an exact decimal: commas, "$", spaces and a trailing period are
    dropped, a minus sign (ASCII or U+2212) before or after "$" is kept. None when there is no number."""
    match = _NUMBER.search(text)
    if not match:
        return None
    raw = match.group(0)
    negative = raw.count("-") + raw.count("−") == 1
    digits = re.sub(r"[^\d.]", "", raw)
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None
    return -value if negative else value


def extract_answer(text: str, markers: list[str] | None = None) -> Decimal | None:
    """The number after the earliest answer marker in ``text`` (None if no marker is followed by one)."""
    markers = MARKERS if markers is None else markers
    found = [(text.find(m), m) for m in markers if m in text]
    for start, marker in sorted(found):
        value = parse_number(text[start + len(marker) :])
        if value is not None:
            return value
    return None


def reference_answer(text: str, markers: list[str] | None = None) -> Decimal | None:
    """The reference number: after a marker ("#### 72"), or the answer itself when it is a bare number."""
    value = extract_answer(text, markers)
    if value is None and re.fullmatch(r"\s*" + _NUMBER.pattern + r"\.?\s*", text):
        value = parse_number(text)
    return value


@dataclass
class Score:
    correct: int = 0
    total: int = 0
    unparsed: int = 0
    records: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "unparsed": self.unparsed,
        }


def score(
    predictions: list[str],
    references: list[str],
    markers: list[str] | None = None,
    reference_markers: list[str] | None = None,
) -> Score:
    """Exact match of the extracted numbers (by value); a prediction without an answer counts as wrong.
    ``markers`` find the answer in predictions, ``reference_markers`` in references (both default to
    MARKERS)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    reference_markers = MARKERS if reference_markers is None else reference_markers
    result = Score()
    for prediction, reference in zip(predictions, references):
        expected = reference_answer(reference, reference_markers)
        if expected is None:
            wanted = " or ".join(repr(f"{m} <number>") for m in reference_markers)
            raise DataError(
                f"no reference number in {reference[-80:]!r} (expected {wanted}, or a bare number; "
                "--reference_markers)"
            )
        got = extract_answer(prediction, markers)
        ok = got is not None and got == expected
        result.total += 1
        result.correct += ok
        result.unparsed += got is None
        result.records.append(
            {
                "prediction": prediction,
                "extracted": None if got is None else str(got),
                "reference": str(expected),
                "correct": ok,
            }
        )
    return result


# -- options ------------------------------------------------------------------------------------------------
@dataclass
class EvalOptions(FormatOptions):
    """Options of the evaluator. Format options left unset come from the training run's config."""

    data: str | None = opt(None, "Evaluation data (.jsonl/.json/.csv, a folder or a Hub id).", path=True)
    adapter: str | None = opt(
        None, "PEFT adapter folder (a train_llm.py output_dir); None = the base model alone.", path=True
    )
    model: str | None = opt(None, "Base model; None = base_model_name_or_path of the adapter.", path=True)
    tokenizer: str | None = opt(None, "Tokenizer; None = the adapter folder's, else the model's.", path=True)
    revision: str | None = opt(None, "Revision of the base model on the Hub.")
    trust_remote_code: bool = opt(False, "Allow model code from the Hub.")
    data_config_name: str | None = opt(None, "Config name of a Hub dataset (GSM8K: main).")
    split: str = opt("test", "Split of a Hub dataset.")
    max_samples: int | None = opt(None, "Evaluate only the first N rows.")
    prompt_field: str = opt("question", "Column holding the question.")
    response_field: str = opt("answer", "Column holding the reference answer ('... #### 72').")
    prompt_template: str | None = opt(
        None, "Prompt template; None = the training run's (else '{prompt}\\n')."
    )
    use_chat_template: bool | None = opt(None, "Use the chat template; None = as in training.")
    markers: list[str] = opt(
        list(MARKERS),
        "Answer markers of the predictions: the number after the first one found in the generated text.",
    )
    reference_markers: list[str] = opt(
        list(MARKERS),
        "Answer markers of the references (the response_field): the number after the first one found; "
        "a bare number needs none.",
    )
    max_new_tokens: int = opt(512, "Most tokens generated per question.")
    batch_size: int = opt(8, "Questions generated together (left-padded).")
    dtype: str = opt("auto", "Weights dtype.", choices=("auto", "float32", "bfloat16", "float16"))
    merge: bool = opt(True, "Merge the adapter into the weights before generating (faster, same model).")
    output: str | None = opt(
        None, "Write every prediction (text, extracted, reference, correct) to this JSONL."
    )

    def validate(self) -> None:
        check_choices(self)
        self.validate_format()
        if not self.data:
            raise OptionError("no data: pass --data (a .jsonl file of question/answer rows)")
        if not (self.model or self.adapter):
            raise OptionError("pass --adapter (a PEFT adapter folder) and/or --model (the base model)")
        if self.adapter and not (Path(self.adapter) / ADAPTER_CONFIG).is_file():
            raise OptionError(f"--adapter: no {ADAPTER_CONFIG} in {self.adapter}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise OptionError("--max_new_tokens and --batch_size must be >= 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise OptionError(f"--max_samples must be >= 1, got {self.max_samples}")
        if not self.markers:
            raise OptionError("--markers needs at least one marker")
        if not self.reference_markers:
            raise OptionError("--reference_markers needs at least one marker")


def resolve(options: EvalOptions) -> EvalOptions:
    """Fill what was left unset from the adapter folder: the base model (adapter_config.json) and the prompt
    format of the training run (training_config.yaml), so prompts are rendered as they were in training."""
    from dataclasses import replace

    changes: dict = {}
    if options.adapter:
        folder = Path(options.adapter)
        if not options.model:
            changes["model"] = json.loads((folder / ADAPTER_CONFIG).read_text()).get(
                "base_model_name_or_path"
            )
            if not changes["model"]:
                raise OptionError(f"--model: {folder / ADAPTER_CONFIG} names no base model; pass --model")
        trained = folder / "training_config.yaml"
        if trained.is_file():
            config = yaml.safe_load(trained.read_text()) or {}
            for name in ("prompt_template", "use_chat_template", "system_prompt"):
                if getattr(options, name) is None and config.get(name) is not None:
                    changes[name] = config[name]
        if not options.tokenizer and (folder / "tokenizer_config.json").is_file():
            changes["tokenizer"] = str(folder)
    return replace(options, **changes)


# -- generation ---------------------------------------------------------------------------------------------
def load_model(options: EvalOptions):
    """Base model + adapter (merged unless --merge false), in eval mode on the GPU when there is one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    revision = options.revision or "main"
    tokenizer = AutoTokenizer.from_pretrained(
        options.tokenizer or options.model, revision=revision, trust_remote_code=options.trust_remote_code
    )
    dtype = "auto" if options.dtype == "auto" else _DTYPES[options.dtype]
    model = AutoModelForCausalLM.from_pretrained(
        options.model, revision=revision, dtype=dtype, trust_remote_code=options.trust_remote_code
    )
    if options.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, options.adapter)
        if options.merge:
            model = model.merge_and_unload()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of tokenized prompts, left-padded in batches (the new tokens only, decoded)."""
    from .data import pad_id

    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


def evaluate(options: EvalOptions) -> dict:
    """Generate an answer for every row and score them; prints (and returns) the summary as JSON."""
    options = resolve(options)
    fmt = options.prompt_format()
    check_data(options.data, "--data")
    rows = read_rows(options.data, options.data_config_name, options.split, options.max_samples)
    references = [reference_text(row, fmt) for row in rows]
    check_model(options.model, "--model", options.revision)
    if options.tokenizer:
        check_tokenizer(options.tokenizer, "--tokenizer")
    model, tokenizer = load_model(options)
    prompts = [prompt_ids(row, fmt, tokenizer) for row in rows]
    predictions = generate(model, tokenizer, prompts, options.max_new_tokens, options.batch_size)
    result = score(predictions, references, options.markers, options.reference_markers)
    summary = {**result.summary(), "model": options.model, "adapter": options.adapter, "data": options.data}
    if options.output:
        out = Path(options.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for record in result.records:
                f.write(json.dumps(record) + "\n")
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_cli(evaluate, EvalOptions, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
