"""Options of train_llm.py and of the evaluator: the shared training options plus the causal-LM ones.

How a row becomes text (`FormatOptions`) is shared by training and evaluation, so a prompt is rendered the
same way in both; the evaluator takes the training run's format from its ``training_config.yaml`` when not
told otherwise.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from ..options import OptionError, TrainOptions, core_opt, opt
from .data import PromptFormat

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every linear projection of attention and MLP in the Llama family (also Mistral, Qwen 2/2.5/3, Gemma)."""


# Inits that rewrite W0 when the adapter is attached: the exported adapter would not apply to the stock base.
@dataclass
class FormatOptions:
    """How a data row is rendered into a prompt and a response (training and evaluation alike)."""

    prompt_field: str = opt("prompt", "Column holding the prompt (instruction / question).")
    response_field: str = opt("response", "Column holding the response (trained on; the reference answer).")
    messages_field: str = opt(
        "messages", "Column of chat rows: a list of {role, content}; rendered with the chat template."
    )
    prompt_template: str | None = opt(
        "{prompt}\n",
        "How the prompt is written before the response: a Python format string over the row's columns, "
        "{prompt} being the prompt_field (e.g. '### Instruction:\\n{prompt}\\n\\n### Response:\\n').",
    )
    use_chat_template: bool | None = opt(
        False, "Render prompt/response rows as a user turn and an assistant turn with the chat template."
    )
    system_prompt: str | None = opt(None, "A system turn put before chat rows that have none.")

    def prompt_format(self) -> PromptFormat:
        return PromptFormat(
            prompt_field=self.prompt_field,
            response_field=self.response_field,
            messages_field=self.messages_field,
            template=self.prompt_template if self.prompt_template is not None else "{prompt}\n",
            use_chat_template=bool(self.use_chat_template),
            system_prompt=self.system_prompt,
        )

    def validate_format(self) -> None:
        """The template must be a format string naming only columns (checked before any data is read)."""
        if self.prompt_template is None:
            return
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name]
        except ValueError as err:
            raise OptionError(
                f"--prompt_template: not a format string ({err}); write braces as {{{{ }}}}"
            ) from None
        for name in names:
            if not name.isidentifier():
                raise OptionError(f"--prompt_template: '{{{name}}}' must name a column, like {{prompt}}")


@dataclass
class LLMOptions(TrainOptions, FormatOptions):
    """Options of the causal-LM trainer (the shared ones come from TrainOptions)."""

    model: str | None = opt(
        None, "Base causal LM: Hub id or local folder (anything AutoModelForCausalLM loads).", path=True
    )
    tokenizer: str | None = opt(None, "Tokenizer, if not the model's.", path=True)
    revision: str | None = opt(None, "Revision of the base model on the Hub.")
    trust_remote_code: bool = opt(False, "Allow model code from the Hub (needed by some architectures).")
    attn_implementation: str | None = opt(
        None,
        "Attention kernel; None = transformers' default.",
        choices=("eager", "sdpa", "flash_attention_2"),
    )
    dataset: str | None = opt(
        None,
        "Training data: a .jsonl / .json / .csv / .parquet file, a save_to_disk folder, or a Hub dataset id.",
        path=True,
    )
    dataset_config_name: str | None = opt(None, "Config name of a Hub dataset.")
    dataset_split: str = opt("train", "Split of a Hub dataset to train on.")
    max_train_samples: int | None = opt(None, "Use only the first N rows of the training data.")
    eval_dataset: str | None = opt(
        None, "Held-out data (same formats): loss and perplexity every validation_steps.", path=True
    )
    eval_split: str = opt("test", "Split of a Hub eval_dataset.")
    max_eval_samples: int | None = opt(None, "Use only the first N rows of the eval data.")
    max_length: int = opt(1024, "Longest sequence in tokens; longer examples are truncated (and counted).")
    packing: bool = opt(
        False,
        "Pack several examples into each sequence of max_length (attention stays within each example).",
    )
    target_modules: list[str] = opt(list(LLAMA_TARGETS), "Modules to adapt (suffix match, as in PEFT).")
    rank: int = core_opt("rank", 8)
    alpha: float | None = core_opt(
        "alpha", 16.0, "LoRA alpha of the primary branch (s1 = alpha / rank). Paper: 16."
    )
    merge: bool = opt(False, "Also write the merged full model (base + primary LoRA) to output_dir/merged.")
    eval_accuracy: bool = opt(
        False,
        "At the end, answer every eval_dataset question greedily without and with the LoRA and log both "
        "exact-match accuracies (the evaluator's scoring; output_dir/accuracy.json).",
    )
    eval_max_new_tokens: int = opt(64, "Most tokens generated per question for eval_accuracy.")

    def validate(self) -> None:
        super().validate()
        self.validate_format()
        if not self.dataset:
            raise OptionError(
                "no data: pass --dataset (a .jsonl/.json/.csv file, a folder or a Hub dataset id)"
            )
        if not self.model:
            raise OptionError("no model: pass --model (a Hub id or a local folder)")
        if self.eval_accuracy and not self.eval_dataset:
            raise OptionError("--eval_accuracy needs --eval_dataset (the held-out questions)")
        if self.eval_max_new_tokens < 1:
            raise OptionError(f"--eval_max_new_tokens must be >= 1, got {self.eval_max_new_tokens}")
        if self.max_length < 2:
            raise OptionError(f"--max_length must be >= 2, got {self.max_length}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise OptionError(f"--{name} must be >= 1, got {value}")
