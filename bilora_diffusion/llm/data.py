"""Instruction data for causal LMs: rows from files or the Hub, tokenized with the loss on responses only.

A row is either a prompt/response pair (column names configurable, the prompt written through a format
template) or a chat: a list of ``{"role", "content"}`` messages rendered with the tokenizer's chat template.
Each row becomes segments of text that are trained on or not; each segment is tokenized on its own and the
ids are concatenated, so the prompt's ids are exactly those the evaluator feeds to ``generate`` (tokenizing
prompt + response as one string can merge tokens across the boundary, and then training and generation see
different prompts). Labels are the ids on response segments and -100 (ignored by the loss) elsewhere.

Everything here is a pure function of the rows and the tokenizer: every process builds the same examples,
and the batch order is drawn later from (seed, epoch) alone.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, TemplateError

logger = logging.getLogger(__name__)

IGNORE = -100
"""Label of tokens the loss skips (prompt, padding): torch's cross-entropy ignore_index."""
_TOKENIZE_CHUNK = 1000


@dataclass
class PromptFormat:
    """How a row becomes text; built from the options (`FormatOptions.prompt_format`)."""

    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    template: str = "{prompt}\n"
    use_chat_template: bool = False
    system_prompt: str | None = None


@dataclass
class Segment:
    """A piece of a rendered row. ``special``: tokenize with the tokenizer's special tokens (the BOS of a
    plain row's prompt); ``eos``: append the EOS id after it (the end of a plain row's response)."""

    text: str
    trained: bool
    special: bool = False
    eos: bool = False


@dataclass
class Example:
    """One training sequence: ids, labels (IGNORE where not trained), positions (reset per packed example)."""

    input_ids: list[int]
    labels: list[int]
    key: str
    position_ids: list[int] | None = None


@dataclass
class DataReport:
    """What tokenization did to a dataset; `summary()` is logged, the numbers are kept for tests and logs."""

    name: str
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    longest: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    bad_rows: list[str] = field(default_factory=list)

    def summary(self, max_length: int) -> str:
        text = (
            f"{self.name}: {self.examples} examples from {self.rows} rows, {self.tokens} tokens "
            f"({self.trained_tokens} trained), longest {self.longest}"
        )
        if self.truncated:
            text += f"; {self.truncated} truncated to --max_length {max_length}"
        if self.dropped:
            text += f", {self.dropped} dropped (no response token left within --max_length)"
        if self.bad_rows:
            text += f"; {len(self.bad_rows)} bad rows skipped ({'; '.join(self.bad_rows[:3])})"
        return text


# -- reading rows -------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a JSON Lines file named .json
            return _read_jsonl(path)
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the one list of records in it
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of records (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of JSON objects")
    return data


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _read_with_datasets(source: str, config_name: str | None, split: str, limit: int | None) -> list[dict]:
    import datasets

    try:
        if os.path.isdir(source) and any(
            (Path(source) / name).is_file()
            for name in ("dataset_info.json", "dataset_dict.json", "state.json")
        ):
            data = datasets.load_from_disk(source)
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DataError(f"{source}: no split {split!r} (has {', '.join(data)})")
                data = data[split]
        elif source.endswith(".parquet"):
            data = datasets.load_dataset("parquet", data_files=source, split="train")
        else:
            data = datasets.load_dataset(source, config_name, split=split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError...)
        raise DataError(f"could not load dataset {source!r} (split {split!r}): {err}") from err
    if limit is not None and limit < len(data):
        data = data.select(range(limit))  # before the rows become Python dicts
    return [dict(row) for row in data]


def read_rows(
    source: str, config_name: str | None = None, split: str = "train", limit: int | None = None
) -> list[dict]:
    """The rows of a dataset: a .jsonl / .json / .csv file (read here, so a bad line is named), a .parquet
    file, a ``save_to_disk`` folder, a folder of data files or a Hub id (through `datasets`)."""
    path = Path(source)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    if path.suffix.lower() in readers or path.suffix.lower() == ".parquet":
        if not path.is_file():
            raise DataError(f"no such data file: {source}")
    if path.suffix.lower() in readers:
        rows = readers[path.suffix.lower()](path)
    else:
        rows = _read_with_datasets(source, config_name, split, limit)
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows[:limit] if limit else rows


# -- rendering rows -----------------------------------------------------------------------------------------
class _Columns(dict):
    """The row's columns for the prompt template, naming the missing one."""

    def __missing__(self, key: str) -> str:
        raise DataError(f"no column {key!r} (the prompt template uses it)")


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"missing or empty {name!r}")
    return value if isinstance(value, str) else str(value)


def render_prompt(row: dict, fmt: PromptFormat) -> str:
    """The prompt text of a prompt/response row (through the template)."""
    return fmt.template.format_map(_Columns(row, prompt=_text(row, fmt.prompt_field)))


def chat_messages(row: dict, fmt: PromptFormat) -> list[dict[str, str]]:
    """The conversation of a row: its messages column, or the prompt/response pair as a user and an
    assistant turn; the system prompt is put first when the conversation has none."""
    messages = row.get(fmt.messages_field)
    if messages is None:
        messages = [
            {"role": "user", "content": render_prompt(row, fmt).strip()},
            {"role": "assistant", "content": _text(row, fmt.response_field)},
        ]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise DataError(f"{fmt.messages_field!r} must be a list of {{role, content}} objects")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if fmt.system_prompt and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": fmt.system_prompt})
    return messages


def is_chat(row: dict, fmt: PromptFormat) -> bool:
    return fmt.use_chat_template or row.get(fmt.messages_field) is not None


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "chat rows need a tokenizer with a chat template (this one has none): give prompt/response "
            "columns instead, or --tokenizer with a chat template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(tokenizer, messages: list[dict]) -> list[Segment]:
    """A conversation cut at its assistant turns: the text of each assistant turn (what the template adds
    for it, end-of-turn token included) is trained on; the rest (system, user, role headers) is not.

    Relies on the template rendering every prefix of the conversation as a prefix of the whole, which real
    templates do; a template that does not is refused rather than masked wrongly."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("the conversation has no assistant turn to train on")
    segments, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], True) if k else ""
        after = _render(tokenizer, messages[: k + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise TemplateError(
                "the tokenizer's chat template does not render a conversation's prefix as a prefix of the "
                "conversation, so prompt and response tokens cannot be told apart"
            )
        segments += [Segment(before[len(done) :], False), Segment(after[len(before) :], True)]
        done = after
    rest = _render(tokenizer, messages, False)[len(done) :]
    return [s for s in [*segments, Segment(rest, False)] if s.text]


def row_segments(row: dict, fmt: PromptFormat, tokenizer) -> list[Segment]:
    """The training segments of a row."""
    if is_chat(row, fmt):
        return chat_segments(tokenizer, chat_messages(row, fmt))
    prompt = render_prompt(row, fmt)
    return [Segment(prompt, False, special=True), Segment(_text(row, fmt.response_field), True, eos=True)]


def prompt_ids(row: dict, fmt: PromptFormat, tokenizer) -> list[int]:
    """The ids a model generates from, tokenized exactly as the untrained head of a training example: the
    prompt (plain rows) or the conversation up to its last assistant turn, with the generation prompt."""
    if is_chat(row, fmt):
        messages = chat_messages(row, fmt)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return tokenizer(_render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]
    return tokenizer(render_prompt(row, fmt), add_special_tokens=True)["input_ids"]


def reference_text(row: dict, fmt: PromptFormat) -> str:
    """The reference response of a row: its response column, or the last assistant turn of a chat."""
    if row.get(fmt.messages_field) is not None:
        turns = [m for m in chat_messages(row, fmt) if m["role"] == "assistant"]
        if not turns:
            raise DataError("the conversation has no assistant turn")
        return turns[-1]["content"]
    return _text(row, fmt.response_field)


# -- tokenizing ---------------------------------------------------------------------------------------------
def _tokenize_all(tokenizer, segments: list[Segment]) -> list[list[int]]:
    """Ids of every segment, in batches (fast tokenizers encode a batch in parallel)."""
    ids: list[list[int] | None] = [None] * len(segments)
    for special in (True, False):
        where = [i for i, s in enumerate(segments) if s.special == special]
        for start in range(0, len(where), _TOKENIZE_CHUNK):
            chunk = where[start : start + _TOKENIZE_CHUNK]
            encoded = tokenizer([segments[i].text for i in chunk], add_special_tokens=special)["input_ids"]
            for i, row_ids in zip(chunk, encoded):
                ids[i] = list(row_ids)
    return ids  # type: ignore[return-value]


def _assemble(segments: list[Segment], ids: list[list[int]], eos_id: int | None) -> tuple[list, list]:
    input_ids: list[int] = []
    labels: list[int] = []
    for segment, seg_ids in zip(segments, ids):
        if segment.eos and eos_id is not None and (not seg_ids or seg_ids[-1] != eos_id):
            seg_ids = [*seg_ids, eos_id]
        input_ids += seg_ids
        labels += seg_ids if segment.trained else [IGNORE] * len(seg_ids)
    return input_ids, labels


def tokenize_rows(
    rows: Sequence[dict], tokenizer, fmt: PromptFormat, max_length: int, name: str = "data"
) -> tuple[list[Example], DataReport]:
    """Examples with response-only labels, cut to ``max_length`` (right truncation, counted). An example with
    no trained token left after the cut is dropped: it would give the loss nothing (0/0). Rows that cannot
    be rendered are skipped and named in the report; if none is left, DataError."""
    report = DataReport(name, rows=len(rows))
    per_row: list[tuple[int, list[Segment]]] = []
    for i, row in enumerate(rows):
        try:
            per_row.append((i, row_segments(row, fmt, tokenizer)))
        except TemplateError:
            raise
        except DataError as err:
            report.bad_rows.append(f"row {i}: {err}")
    flat = [s for _, segments in per_row for s in segments]
    flat_ids = iter(_tokenize_all(tokenizer, flat))
    examples = []
    for i, segments in per_row:
        input_ids, labels = _assemble(segments, [next(flat_ids) for _ in segments], tokenizer.eos_token_id)
        report.longest = max(report.longest, len(input_ids))
        if len(input_ids) > max_length:
            report.truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        # The model predicts token t from tokens < t: a label at position 0 is never used.
        if all(label == IGNORE for label in labels[1:]):
            report.dropped += 1
            continue
        examples.append(Example(input_ids, labels, f"row {i}"))
        report.tokens += len(input_ids)
        report.trained_tokens += sum(label != IGNORE for label in labels[1:])
    report.examples = len(examples)
    if not examples:
        reasons = report.bad_rows[:3] or [f"{report.dropped} rows with no response within --max_length"]
        raise DataError(f"{name}: no usable example ({'; '.join(reasons)})")
    return examples, report


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Greedy packing in data order: whole examples are concatenated into sequences of at most max_length.
    Position ids restart at 0 for each example; transformers reads that (with no attention mask) as packed
    sequences and keeps attention within each example (`masking_utils.find_packed_sequence_indices`)."""
    packs: list[Example] = []
    current: Example | None = None
    for example in examples:
        n = len(example.input_ids)
        if current is None or len(current.input_ids) + n > max_length:
            current = Example([], [], example.key, [])
            packs.append(current)
        else:
            current.key += f"+{example.key.removeprefix('row ')}"
        current.input_ids += example.input_ids
        current.labels += example.labels
        current.position_ids += list(range(n))
    return packs


# -- batches ------------------------------------------------------------------------------------------------
@dataclass
class LMBatch:
    """A padded micro-batch. Packed batches carry position ids and no attention mask (see `pack`)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    keys: list[str]

    def model_inputs(self, device: torch.device | str) -> dict[str, Any]:
        inputs = {"input_ids": self.input_ids.to(device), "labels": self.labels.to(device)}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask.to(device)
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids.to(device)
        return inputs

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss averages over (labels after the one-token shift)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def collate(examples: Sequence[Example], pad_id: int) -> LMBatch:
    """Right-pad to the longest example; padding has label IGNORE (and, unpacked, attention mask 0)."""
    width = max(len(e.input_ids) for e in examples)
    packed = examples[0].position_ids is not None
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
        if packed:
            # Padding counts as one more packed sequence (positions from 0): it attends only to itself.
            positions[row, :n] = torch.tensor(example.position_ids)
            positions[row, n:] = torch.arange(width - n)
    return LMBatch(
        ids, labels, None if packed else mask, positions if packed else None, [e.key for e in examples]
    )


def pad_id(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else EOS (padding is masked out and never trained)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
