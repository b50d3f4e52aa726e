"""GEMConfig: every knob of the method, saved as ``gem_config.json`` beside a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from .template import check_template

CONFIG_NAME = "gem_config.json"
LAYOUTS = ("split", "reconstruct")
# "full": every weight trains (the paper). "summary": the base model is frozen; low-rank deltas act
# only at summary positions (gem/adapter.py), so plain text runs through the untouched base model.
TRAIN_MODES = ("full", "summary")
ADAPTER_POSITIONS = ("special", "special+suffix")


class GEMConfigError(ValueError):
    """A GEMConfig field with a value the method cannot use. ``field`` and ``value`` let a command
    line name its own flag instead of the field (train.py: --gem-num-special-tokens 0)."""

    def __init__(self, field: str, value, why: str):
        super().__init__(f"GEMConfig.{field}={value!r}: {why}")
        self.field, self.value, self.why = field, value, why


@dataclass
class GEMConfig:
    # Summary tokens (docs/method.md): K distinct new vocabulary entries.
    num_special_tokens: int = 1
    special_token_template: str = "<|gem_{i}|>"
    # Filled in when the tokens are added to a tokenizer; saved so readout needs no guessing.
    special_token_ids: list[int] = field(default_factory=list)
    # Phase 1, mixed NTP (docs/method.md): a document is `plain` with probability p_raw, else `layout`.
    p_raw: float = 0.8
    layout: str = "split"
    min_prefix_len: int = 4  # counted in tokens, BOS included
    min_suffix_len: int = 4
    # Mask option (docs/method.md: ours, the paper is silent): keep the document's first token visible to the suffix.
    suffix_sees_bos: bool = False
    # Phase 2, contrastive (docs/method.md).
    prefix_dropout: float = 0.1  # token deletion rate of the positive view
    logit_scale_init: float = 20.0
    logit_scale_max: float = 100.0
    contrastive_from_step: int = 100
    alpha: float = 1.0  # phase-2 weight of the contrastive loss; < 1 keeps some NTP
    # Instruction prepended (as text) to the query/anchor side of phase 2 and, at inference, to
    # queries (GEMEmbedder.encode_queries, the sentence-transformers "query" prompt); "" = none.
    query_prompt: str = ""
    # Template with one "{text}" wrapped around every embedded text before its summary tokens, in
    # phase-2 views and at inference (gem/template.py; e.g. PromptEOL's); "" = the bare text.
    embed_template: str = ""
    # Teacher distillation in phase 2 (docs/method.md; used only when a teacher is given, train.py
    # --contrastive-teacher): the share of the teacher's KL term in the contrastive loss (1: the
    # teacher alone; the rest is InfoNCE) and the temperature of the teacher's similarity softmax.
    teacher_weight: float = 1.0
    teacher_temperature: float = 0.05
    # Summary mode (docs/method.md, "Summary mode"): frozen base, deltas at summary positions.
    train_mode: str = "full"
    adapter_rank: int = 16
    adapter_alpha: float = 32.0
    adapter_targets: list[str] = field(default_factory=list)  # empty: the engine's defaults (every attention and MLP projection)
    adapter_positions: str = "special"
    # Summary mode reuses K existing vocabulary tokens (rows frozen) instead of adding new ones;
    # empty: chosen from the tokenizer's unused special tokens (gem/tokens.py).
    summary_tokens: list[str] = field(default_factory=list)
    # The untouched base checkpoint an adapter export needs (name and content digest).
    base_model: str = ""
    base_model_digest: str = ""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def summary_mode(self) -> bool:
        return self.train_mode == "summary"

    @property
    def special_tokens(self) -> list[str]:
        return [self.special_token_template.format(i=i) for i in range(self.num_special_tokens)]

    def validate(self) -> None:
        def bad(name: str, why: str) -> GEMConfigError:
            return GEMConfigError(name, getattr(self, name), why)

        if not isinstance(self.num_special_tokens, int) or self.num_special_tokens < 1:
            raise bad("num_special_tokens", "must be an integer >= 1")
        if "{i}" not in self.special_token_template:
            raise bad("special_token_template", "must contain '{i}' so the K tokens are distinct")
        if not 0.0 <= self.p_raw <= 1.0:
            raise bad("p_raw", "must lie in [0, 1]")
        if self.layout not in LAYOUTS:
            raise bad("layout", f"must be one of {LAYOUTS}")
        if self.min_prefix_len < 1 or self.min_suffix_len < 1:
            raise bad("min_prefix_len" if self.min_prefix_len < 1 else "min_suffix_len", "must be >= 1")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise bad("prefix_dropout", "must lie in [0, 1)")
        if not (math.isfinite(self.logit_scale_max) and self.logit_scale_max >= 1.0):
            raise bad("logit_scale_max", "must be a finite number >= 1")
        if not 1.0 <= self.logit_scale_init <= self.logit_scale_max:
            raise bad("logit_scale_init", f"must lie in [1, logit_scale_max={self.logit_scale_max}]")
        if self.contrastive_from_step < 0:
            raise bad("contrastive_from_step", "must be >= 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise bad("alpha", "must lie in [0, 1]")
        if not (isinstance(self.teacher_weight, (int, float)) and 0.0 < self.teacher_weight <= 1.0):
            raise bad("teacher_weight", "must lie in (0, 1] (1: the teacher alone; below 1 mixed with InfoNCE)")
        if not (isinstance(self.teacher_temperature, (int, float)) and math.isfinite(self.teacher_temperature) and self.teacher_temperature > 0):
            raise bad("teacher_temperature", "must be a finite number > 0")
        if not isinstance(self.query_prompt, str):
            raise bad("query_prompt", "must be a string")
        try:
            check_template(self.embed_template)
        except ValueError as e:
            raise bad("embed_template", str(e)) from None
        if self.train_mode not in TRAIN_MODES:
            raise bad("train_mode", f"must be one of {TRAIN_MODES}")
        if not isinstance(self.adapter_rank, int) or self.adapter_rank < 1:
            raise bad("adapter_rank", "must be an integer >= 1")
        if not (math.isfinite(self.adapter_alpha) and self.adapter_alpha > 0):
            raise bad("adapter_alpha", "must be a finite number > 0")
        if self.adapter_positions not in ADAPTER_POSITIONS:
            raise bad("adapter_positions", f"must be one of {ADAPTER_POSITIONS}")
        if self.summary_tokens and len(self.summary_tokens) != self.num_special_tokens:
            raise bad("summary_tokens", f"needs exactly num_special_tokens={self.num_special_tokens} token names")
        if self.special_token_ids and len(self.special_token_ids) != self.num_special_tokens:
            raise bad("special_token_ids", f"needs exactly num_special_tokens={self.num_special_tokens} ids")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GEMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GEMConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``gem_config.json`` into ``directory`` atomically; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory_or_file: str | os.PathLike) -> "GEMConfig":
        path = str(directory_or_file)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}: is this a GEM checkpoint?")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e
