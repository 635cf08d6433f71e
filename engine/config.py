"""Run configuration: dataclasses whose fields each carry their help text.

The same help text feeds `cpt-studio train --help`, the GUI tooltips and docs. A config is saved as
YAML with `schema_version`; loading checks every field and raises one ConfigError naming each bad
field and what is allowed.

    cfg = RunConfig.load("run.yaml")            # or RunConfig() for the defaults
    cfg = apply_overrides(cfg, ["training.learning_rate=1e-4"])
    cfg.save("run.yaml")
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError

SCHEMA_VERSION = 1
# Tokens in one micro-batch (batch_size x seq_len): 2**24 is far past what any machine holds for a
# model of more than a few million parameters (activations alone are tens of kB a token).
MAX_MICRO_BATCH_TOKENS = 2 ** 24

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "8bit", "4bit")
EMBEDDING_MODES = ("off", "full", "lora")
SCHEDULES = ("cosine", "linear", "constant")
KERNEL_MODES = ("auto", "on", "off")
EMBEDDING_OPTIMIZERS = ("auto", "adamw", "adamw8bit", "fused8bit")
EMBEDDING_WEIGHTS = ("auto", "fp32", "bf16")
LORA_OPTIMIZERS = ("adamw", "fused8bit")
OFFLOAD_MODES = ("auto", "on", "off")


def option(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None):
    """A dataclass field with its help text (and optional allowed values / bounds) in metadata."""
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    source: str = option("", "Base model: a local Hugging Face folder, a .gguf file, a hub id (when "
                         "online), or a past run / adapter folder (its base model is read from "
                         "adapter_config.json). Empty means the embedded default (SmolLM2-135M).")
    precision: str = option("auto", "Weights of the frozen base: fp32, bf16, fp16, 8bit or 4bit "
                            "(NF4 with double quantization). auto = 4bit on a CUDA GPU, fp32 on CPU.",
                            choices=PRECISIONS)
    trust_remote_code: bool = option(False, "Run Python code shipped with the model. Only turn this "
                                     "on for models you trust.")


@dataclass
class AdapterConfig:
    r: int = option(16, "LoRA rank.", minimum=1, maximum=4096)
    alpha: float = option(32.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).",
                          minimum=0.0)
    dropout: float = option(0.0, "Dropout on the LoRA input.", minimum=0.0, maximum=0.99)
    rslora: bool = option(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    target_modules: list = option([], "Names of Linear modules to adapt (e.g. q_proj, down_proj). "
                                  "Empty = every Linear in the decoder layers.")
    embed_tokens: str = option("full", "Input embeddings: off (frozen), full (trained copy) or lora.",
                               choices=EMBEDDING_MODES)
    lm_head: str = option("full", "Output head: off (frozen), full (trained copy) or lora. With tied "
                          "embeddings the two share one matrix: full on either side trains it fully, "
                          "else lora on either side adapts it, and it stays tied.",
                          choices=EMBEDDING_MODES)


@dataclass
class DataConfig:
    train_files: list = option([], "Corpus files or folders: .txt .md .jsonl .json .csv .parquet, "
                               "or a Hugging Face dataset folder. Empty means the sample corpus. "
                               "A folder is read without leaving it: links to folders, and links "
                               "to files outside it, are skipped (with a note in the log).")
    eval_files: list = option([], "Held-out files for eval. Empty = split eval_fraction off the corpus.")
    retention_files: list = option([], "General text to watch for forgetting (evaluated beside the "
                                   "held-out split). Optional.")
    text_column: str = option("", "Column holding the text in jsonl/json/csv/parquet. Empty = detect.")
    seq_len: int = option(512, "Tokens per training block (documents are packed, EOS between them).",
                          minimum=8, maximum=1_048_576)
    eval_fraction: float = option(0.05, "Share of blocks held out for eval when no eval_files are "
                                  "given (at least one block).", minimum=0.0, maximum=0.5)
    max_eval_blocks: int = option(64, "At most this many blocks per eval set (keeps eval fast).",
                                  minimum=1, maximum=1_000_000)


@dataclass
class TrainingConfig:
    learning_rate: float = option(2e-4, "Learning rate of LoRA and other non-embedding weights.",
                                  minimum=0.0, maximum=1.0)
    embedding_learning_rate: Optional[float] = option(
        None, "Learning rate of every embed_tokens and lm_head parameter (full or LoRA). Empty = "
        "learning_rate / embedding_lr_ratio.", minimum=0.0, maximum=1.0)
    embedding_lr_ratio: float = option(10.0, "How many times smaller the embedding learning rate is "
                                       "than learning_rate (used when embedding_learning_rate is empty).",
                                       minimum=1.0, maximum=1000.0)
    weight_decay: float = option(0.0, "AdamW weight decay.", minimum=0.0, maximum=1.0)
    batch_size: int = option(4, "Blocks per micro-batch (what one forward and backward holds in "
                             "memory; a larger effective batch comes from grad_accum).",
                             minimum=1, maximum=65536)
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.", minimum=1,
                             maximum=65536)
    max_steps: int = option(100, "Optimizer steps to train. 0 = use epochs.", minimum=0,
                            maximum=1_000_000_000)
    epochs: float = option(1.0, "Passes over the corpus when max_steps is 0.", minimum=0.0,
                           maximum=10_000.0)
    warmup_steps: int = option(10, "Linear warmup steps.", minimum=0, maximum=1_000_000_000)
    schedule: str = option("cosine", "Learning-rate schedule after warmup.", choices=SCHEDULES)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 = off).", minimum=0.0)
    gradient_checkpointing: bool = option(True, "Recompute activations in backward to save memory.")
    seed: int = option(42, "Seed for data order, LoRA init and dropout.", minimum=0,
                       maximum=2 ** 32 - 1)
    kernels: str = option("auto", "Triton kernels: auto = on for CUDA, on, or off.", choices=KERNEL_MODES)
    embedding_optimizer: str = option(
        "auto", "Optimizer of the embeddings group (embed_tokens, lm_head): adamw (torch, fp32 "
        "states, 8 bytes a parameter), adamw8bit (bitsandbytes' blockwise 8-bit states, 2 bytes a "
        "parameter) or fused8bit (CPT Studio's Triton kernel: 8-bit states updated in one pass, "
        "stochastic rounding into bf16 weights). The other group stays torch AdamW. auto = "
        "fused8bit on CUDA with Triton, else adamw8bit on CUDA, adamw elsewhere.",
        choices=EMBEDDING_OPTIMIZERS)
    lora_optimizer: str = option(
        "adamw", "Optimizer of the other group (LoRA and everything not embed_tokens / lm_head): "
        "torch AdamW (fp32 states, 8 bytes a parameter) or fused8bit (8-bit states, 2 bytes; on an "
        "8B model with r16 on every projection that is 0.23 GB less).", choices=LORA_OPTIMIZERS)
    embedding_weights: str = option(
        "auto", "Storage of the fully trained embed_tokens / lm_head copies: fp32 master weights, "
        "or bf16 (half the memory for the weights and their gradients). bf16 needs fused8bit, "
        "whose stochastic rounding keeps updates smaller than a bf16 step from being lost, and "
        "bf16 autocast (CUDA). auto = bf16 when both hold, else fp32.", choices=EMBEDDING_WEIGHTS)
    sparse_embedding_grad: bool = option(
        True, "Compute the trained embed_tokens' gradient only for the rows of the tokens in the "
        "batch instead of a dense vocab x hidden matrix. Applies with fused8bit on models whose "
        "embeddings are not tied; every row is still updated by AdamW.")
    defer_head_grad: bool = option(
        True, "With kernels on, compute a fully trained lm_head's gradient after the layers' "
        "backward instead of in the loss's forward, so the vocab x hidden gradient does not sit in "
        "memory beside the layers' activations (one more lm_head matmul a step).")
    unchecked_layers: int = option(
        0, "With gradient checkpointing, run the last N decoder layers without it: their "
        "activations stay in GPU memory until their backward instead of being recomputed there. "
        "Spends spare GPU memory on speed: on a Llama-8B shape at 2 x 2048 tokens, 8 layers took "
        "+3.9 GiB and gave +4% tokens/s (bench/RESULTS.md, 2026-12-06). The VRAM estimate "
        "counts them. 0 = every layer checkpointed.", minimum=0, maximum=100_000)
    offload_checkpoints: str = option(
        "auto", "With gradient checkpointing, keep each layer's saved input in pinned CPU memory "
        "instead of GPU memory (layers x tokens x hidden x 2 bytes), copied back for the "
        "recompute. auto = on for CUDA.", choices=OFFLOAD_MODES)
    stream_in_compute_dtype: bool = option(
        True, "Under bf16 autocast (CUDA), cast the output of the fp32 trained embed_tokens to bf16 "
        "so hidden states, checkpointed activations and elementwise ops stay bf16; the weights "
        "keep fp32 masters and fp32 gradients. Off = the whole residual stream runs in fp32.")
    free_frozen_embeddings: bool = option(
        True, "Free the frozen base copy that peft keeps beside a fully trained embed_tokens / "
        "lm_head while training (vocab x hidden x 2 bytes each). It is only needed to run the "
        "model with the adapter disabled, which training never does; saved adapters and "
        "checkpoints are unchanged.")
    disabled_transforms: list = option(
        [], "Speed transforms to leave off although the settings above would turn them on, by name "
        "(rmsnorm, swiglu_mlp, rope, lora_forwards, lora_groups, fused_loss, offload_checkpoints, "
        "stream_in_compute_dtype, free_frozen_embeddings, sparse_embedding_grad): for A/B "
        "comparisons and for working around a problem in one of them.")
    log_every_steps: int = option(1, "Emit step metrics every N optimizer steps.", minimum=1)


@dataclass
class EvalConfig:
    every_steps: int = option(50, "Evaluate every N steps (and at step 0 and at the end). 0 = only "
                              "at start and end.", minimum=0)
    sample_prompts: list = option([], "Prompts to complete during training so you can read progress.")
    sample_every_steps: int = option(0, "Generate samples every N steps (0 = with each eval).", minimum=0)
    sample_max_new_tokens: int = option(48, "Tokens generated per sample.", minimum=1, maximum=4096)


@dataclass
class CheckpointConfig:
    every_steps: int = option(50, "Save a checkpoint every N steps (0 = only at the end).", minimum=0)
    keep_last: int = option(3, "Keep this many most recent checkpoints (older ones are deleted).",
                            minimum=1)


@dataclass
class RunConfig:
    name: str = option("run", "Run name, shown in History; the run folder is derived from it.")
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init_from: str = option("", "Continue training from this adapter or checkpoint folder "
                            "(empty = a fresh adapter).")
    init_optimizer_state: bool = option(False, "With init_from pointing at a checkpoint, also load "
                                        "its optimizer state (else a fresh optimizer).")

    # ---- derived values -------------------------------------------------------------------
    @property
    def embedding_lr(self) -> float:
        t = self.training
        if t.embedding_learning_rate is not None:
            return t.embedding_learning_rate
        return t.learning_rate / t.embedding_lr_ratio

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> None:
        from .atomic import write_text_atomic
        write_text_atomic(Path(path), self.to_yaml())

    @classmethod
    def from_dict(cls, data: Any, source: str = "") -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError({"(file)": "expected a mapping of sections (model:, training:, ...)"},
                              source)
        data = dict(data)
        version = data.pop("schema_version", SCHEMA_VERSION)
        problems: dict[str, str] = {}
        if version != SCHEMA_VERSION:
            problems["schema_version"] = f"{version!r} is not supported (this version reads {SCHEMA_VERSION})"
        cfg = _build(cls, data, "", problems)
        for name, msg in validate(cfg).items():
            problems.setdefault(name, msg)
        if problems:
            raise ConfigError(problems, source)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError({"(file)": f"{path} not found"}, str(path),
                              hint="Check the path. The studio's Training page writes a config "
                                   "with Save; `cpt-studio demo` trains the embedded default "
                                   "without one.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError({"(file)": f"cannot read {path}: {exc}"}, str(path),
                              hint="Save the config again as UTF-8 text (the studio's Training "
                                   "page writes one with Save).") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError({"(file)": _yaml_problem(exc)}, str(path),
                              hint="Fix the YAML at the line shown, or save the config again "
                                   "from the studio's Training page.") from None
        return cls.from_dict(data if data is not None else {}, str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong with a YAML text, with its line and column, in words rather than parser jargon."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    if isinstance(exc, yaml.constructor.ConstructorError) and ":python/" in problem:
        return (f"uses a !!python tag{where}; such tags can run code, so a config may not "
                "hold them")
    if isinstance(exc, yaml.constructor.ConstructorError):
        return f"uses a YAML tag{where} that a config may not hold ({problem})"
    return f"not valid YAML{where}: {problem}"


def field_help(section: str, name: str | None = None) -> dict[str, str] | str:
    """Help text of one field (`field_help("training", "seq_len")`) or of a whole section."""
    holder = RunConfig if section == "" else _section_type(section)
    docs = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(holder)}
    return docs[name] if name else docs


def iter_fields(cls=RunConfig, prefix: str = ""):
    """Yield (dotted_name, dataclasses.Field, type) for every leaf field of the config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def apply_overrides(cfg: RunConfig, assignments: list[str]) -> RunConfig:
    """Return a copy of cfg with `section.field=value` assignments applied (values parsed as YAML)."""
    data = cfg.to_dict()
    problems = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems[item] = "expected KEY=VALUE, e.g. training.learning_rate=1e-4"
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                problems[key] = f"unknown section {part!r}"
                break
            node = node[part]
        else:
            if parts[-1] not in node:
                problems[key] = "unknown field"
            else:
                node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, "--set")
    return RunConfig.from_dict(data, "--set")


def validate(cfg: RunConfig) -> dict[str, str]:
    """Check choices, bounds and cross-field rules; returns {dotted field: message}."""
    problems: dict[str, str] = {}
    for name, f, _tp in iter_fields():
        value = _get(cfg, name)
        meta = f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            problems[name] = f"{value!r} is not one of: {', '.join(meta['choices'])}"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                problems[name] = f"{value!r} is not a finite number"
            elif meta.get("min") is not None and value < meta["min"]:
                problems[name] = f"{value!r} is below the minimum {meta['min']}"
            elif meta.get("max") is not None and value > meta["max"]:
                problems[name] = f"{value!r} is above the maximum {meta['max']}"
    t = cfg.training
    tokens = t.batch_size * cfg.data.seq_len
    bad_already = {"training.batch_size", "data.seq_len"} & set(problems)
    if tokens > MAX_MICRO_BATCH_TOKENS and not bad_already:
        problems["training.batch_size"] = (
            f"{t.batch_size} blocks of data.seq_len {cfg.data.seq_len} make {tokens:,} tokens per "
            f"micro-batch, above the maximum {MAX_MICRO_BATCH_TOKENS:,}; lower batch_size or "
            "data.seq_len, and raise grad_accum for a larger effective batch")
    if t.max_steps == 0 and t.epochs <= 0:
        problems["training.max_steps"] = "set max_steps > 0 or epochs > 0"
    if t.warmup_steps and t.max_steps and t.warmup_steps > t.max_steps:
        problems["training.warmup_steps"] = f"{t.warmup_steps} is more than max_steps ({t.max_steps})"
    if t.embedding_weights == "bf16" and t.embedding_optimizer in ("adamw", "adamw8bit"):
        problems["training.embedding_weights"] = (
            f"bf16 embedding weights need embedding_optimizer fused8bit (stochastic rounding), not "
            f"{t.embedding_optimizer}; choose fused8bit or fp32 weights")
    if not cfg.name.strip():
        problems["name"] = "must not be empty"
    a = cfg.adapter
    if not isinstance(cfg.training.disabled_transforms, list) or not all(
            isinstance(m, str) for m in cfg.training.disabled_transforms):
        problems["training.disabled_transforms"] = "must be a list of transform names"
    if not isinstance(a.target_modules, list) or not all(isinstance(m, str) for m in a.target_modules):
        problems["adapter.target_modules"] = "must be a list of module names"
    for name in ("train_files", "eval_files", "retention_files"):
        files = getattr(cfg.data, name)
        if not all(isinstance(p, str) and p.strip() for p in files):
            problems[f"data.{name}"] = "must be a list of file or folder paths"
    if not all(isinstance(p, str) for p in cfg.eval.sample_prompts):
        problems["eval.sample_prompts"] = "must be a list of strings"
    return problems


# ---- helpers -------------------------------------------------------------------------------
def _section_type(section: str):
    hints = typing.get_type_hints(RunConfig)
    if section not in hints or not dataclasses.is_dataclass(hints[section]):
        raise KeyError(section)
    return hints[section]


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _build(cls, data: dict, prefix: str, problems: dict[str, str]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            allowed = ", ".join(sorted(names))
            problems[f"{prefix}{key}"] = f"unknown field (allowed here: {allowed})"
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp, dotted = data[f.name], hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue
            if not isinstance(value, dict):
                problems[dotted] = "expected a section (a mapping of fields)"
                continue
            kwargs[f.name] = _build(tp, value, dotted + ".", problems)
            continue
        ok, converted = _coerce(value, tp)
        if ok:
            kwargs[f.name] = converted
        else:
            problems[dotted] = f"{value!r} is not {_type_name(tp)}"
    return cls(**kwargs)


def _coerce(value, tp):
    """Convert a YAML value to the field's type; returns (ok, value)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return True, None
        return _coerce(value, args[0])
    if tp is bool:
        return (True, value) if isinstance(value, bool) else (False, None)
    if tp is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, None
    if tp is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if tp is str:
        if value is None:
            return True, ""
        return (True, str(value)) if isinstance(value, (str, int, float)) else (False, None)
    if tp is list or origin is list:
        if value is None:
            return True, []
        if isinstance(value, str):
            return True, [value]
        return (True, list(value)) if isinstance(value, (list, tuple)) else (False, None)
    return True, value


def _type_name(tp) -> str:
    names = {bool: "true/false", int: "a whole number", float: "a number", str: "text", list: "a list"}
    if typing.get_origin(tp) is typing.Union:
        return names.get(typing.get_args(tp)[0], "valid") + " or empty"
    return names.get(tp, "valid")
