"""The errors a user can act on, in one place, under one base class.

Every entry point (``train_sdxl.py``, ``train_llm.py``, ``bilora-export``, ``bilora-generate``, ...) catches
`BiLoRAError` and turns it into exit code 2 with a one-line message; anything else is a bug and keeps its
traceback. Each class also keeps the built-in base it had (``ValueError``, ``RuntimeError``), so code that
caught those still does. This module imports nothing from the package: any module may import it.
"""

from __future__ import annotations


class BiLoRAError(Exception):
    """Base of every user-facing error: the message names the file, option or module at fault."""


class ConfigError(BiLoRAError, ValueError):
    """An option has a wrong value. The message names the option."""


class OptionError(BiLoRAError, ValueError):
    """A bad option (unknown, wrong type, out of range). The message names it."""


class BaseModelError(OptionError):
    """The base model named by an option cannot be used; the message names the option, the model and why."""


class DataError(BiLoRAError, ValueError):
    """A dataset problem found before (or, for a file changed since the scan, during) training.

    The message always names the file, the dataset or the option to change.
    """


class TemplateError(DataError):
    """The tokenizer's chat template cannot serve (none, or prefixes not rendered as prefixes): a property
    of the tokenizer, so it stops the run instead of skipping rows."""


class CheckpointError(BiLoRAError, RuntimeError):
    """A checkpoint cannot be written or does not fit this run; the message says which and why."""


class KeyMapError(BiLoRAError, ValueError):
    """A module has no kohya SDXL name that loaders accept. The message names the module."""


class ExportError(BiLoRAError, ValueError):
    """Export refused (or an untrusted LoRA file refused): the message names the file, module or option."""


__all__ = [
    "BaseModelError",
    "BiLoRAError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportError",
    "KeyMapError",
    "OptionError",
    "TemplateError",
]
