"""One typed YAML schema for an experiment. Each section validates itself; every problem in a
file is reported at once, each with its dotted path and what to change. The data sections
(``tokenizer``, ``data``) are data_pipeline.config's; the rest are typed here.

Relative paths in a config are relative to the working directory; ``$VARS`` and ``~`` expand.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from data_pipeline.config import DataConfig, SourceConfig, TokenizerConfig
from norallm.errors import NorallmError
from norallm.files import default_run_dir, expand_path
from norallm.section import Section
from training.config_checks import consistency, number, resolve_tokenizer_strategy, resolve_warm_start

# A variable whose name holds one of these words, in any case and with or without separators
# (HF_TOKEN, GITHUBTOKEN, MY_APIKEY, db_passwd), is a secret. TOKENIZERS_* and *_TOKENS are not.
SECRET_NAME = re.compile(r"TOKEN(?!IZ|S)|KEY|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|AUTH", re.IGNORECASE)
REDACTED = "<redacted: a secret; norallm submit passes it to the job in its environment>"


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's value is a secret: kept out of every file norallm writes
    (config.yaml, checkpoints, wandb, the rendered sbatch scripts)."""
    return bool(SECRET_NAME.search(name))


class ConfigError(NorallmError):
    """All problems found in one config, each as (dotted path, what to change)."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:"]
        lines += [f"  - {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class ModelConfig(Section):
    flavor: str = Field(description="a named shape of a model family (training.model.families: mistral-7b, "
                        "mistral-nemo-12b, norbloom-7b, bloom-7b, tiny-<family>); a warm start without it takes the "
                        "base's shape from model.base/config.json")
    vocab_size: int | None = Field(None, ge=8, description="embedding rows; default tokenizer.vocab_size")
    overrides: dict[str, Any] = Field(default_factory=dict, description="HF config fields over the flavor")
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        "auto", description="auto: sdpa (flash kernel on GPU for causal attention), and flex_attention on a GPU "
        "when documents are masked (data.document_boundaries, SFT: a block mask, never T×T); BLOOM: norallm's "
        "fused ALiBi attention (training.model.alibi), flex_attention on a GPU, sdpa with the ALiBi bias on CPU; "
        "sdpa: PyTorch's fused attention; eager: the reference (transformers' own BLOOM); flash_attention_2: "
        "needs the flash-attn package (not BLOOM)")
    fused_loss: bool = Field(True, description="LM head + cross-entropy in chunks: no full fp32 logits")
    fused_loss_chunk_tokens: int = Field(4096, ge=1, description="tokens per chunk of the fused loss")
    liger_kernel: bool = Field(False, description="liger-kernel's Triton RMSNorm/RoPE/SwiGLU (GPU; else no-op)")
    compile: bool = Field(False, description="torch.compile the model (DeepSpeed engine.compile)")
    init: Literal["scratch", "warm"] = Field("scratch", description="random init, or continue from model.base")
    init_std: float = Field(0.02, gt=0, description="scratch: std of weights; residual outputs / sqrt(2·layers)")
    base: str | None = Field(None, description="warm start: HF model dir (a hub id only where online)")
    base_tokenizer: str | None = Field(None, description="the base model's tokenizer dir; default model.base")
    special_token_map: dict[str, str] = Field(
        default_factory=dict, description="transplant: new special token → base token it copies (e.g. <pad>: </s>)"
    )
    transplant: Literal["strings", "mean"] = Field(
        "strings", description="warm start with a new tokenizer: strings (each new token's rows from its string "
        "in the base vocabulary, copied or averaged: training.model.transplant) or mean (every row the mean base row: "
        "an ablation that keeps the body and drops what the strings carry)")
    tokenizer_strategy: Literal["replace", "keep", "extend"] = Field(
        "replace", description="warm start: replace (train on tokenizer.path, the vocabulary transplanted onto it), "
        "keep (train on the base's own tokenizer: tokenizer.path, vocab sizes and model.vocab_size are taken from "
        "the base), extend (the base's tokenizer plus model.extend_tokens new tokens learned on the corpus, written "
        "to tokenizer.path; old rows untouched, new rows by model.transplant)")
    extend_tokens: int | None = Field(None, ge=1, description="tokenizer_strategy extend: new tokens to add")
    activation_checkpointing: bool = Field(False, description="recompute layer activations in backward")
    export_pad_token_id: int | None = Field(None, ge=0, description="pad_token_id of the exported config.json "
                                            "(NorMistral's published one says 2, </s>); default the tokenizer's pad. "
                                            "Training keeps the tokenizer's: HF never updates the pad row")

    @field_validator("base", "base_tokenizer")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return None if v is None else expand_path(v)

    @classmethod
    def field_problems(cls, fields: dict) -> list[tuple[str, str]]:
        problems = []
        if fields.get("init") == "warm" and not fields.get("base"):
            problems.append(("base", "init: warm needs the base model: set model.base to an HF model dir."))
        strategy = fields.get("tokenizer_strategy", "replace")
        if strategy != "replace" and fields.get("init") != "warm":
            problems.append(("tokenizer_strategy", f"{strategy} chooses a warm start's tokenizer; a scratch init "
                             "has no base tokenizer: set init: warm (with model.base) or remove it."))
        if (strategy == "extend") != (fields.get("extend_tokens") is not None):
            problems.append(("extend_tokens", "goes with tokenizer_strategy: extend (how many tokens to add), and "
                             "only with it: set both or neither."))
        if strategy == "keep" and fields.get("transplant") == "mean":
            problems.append(("transplant", "mean re-lays the embeddings, which tokenizer_strategy: keep keeps; "
                             "choose one."))
        if fields.get("transplant") == "mean" and fields.get("init") != "warm":
            problems.append(("transplant", "mean re-lays a warm start's embeddings; a scratch init has none to "
                             "re-lay: set init: warm (with model.base) or remove it."))
        return problems


class HybridConfig(Section):
    """``train.objective: hybrid``'s masked samples (data_pipeline.masking; NORA 11B's values)."""

    masked_fraction: float = Field(0.1, gt=0, le=1, description="fraction of the samples (or of the global "
                                   "batches, with unit: batch) that are masked ones")
    unit: Literal["sample", "batch"] = Field("sample", description="what is masked or not as one: each sample, "
                                             "or each global batch as a whole (NORA 11B's masked-LM batches)")
    mask_ratio: float = Field(1 / 6, gt=0, le=0.5, description="fraction of a masked sample's tokens corrupted")
    span: tuple[int, int] = Field((1, 3), description="shortest and longest corrupted span, in tokens")
    to_mask: float = Field(0.8, ge=0, le=1, description="corrupted tokens that become the mask token")
    to_random: float = Field(0.1, ge=0, le=1, description="corrupted tokens that become a random token "
                             "(the rest keep their own)")
    mask_token: str = Field("<mask>", description="a special token of the tokenizer (tokenizer.extra_special_tokens)")

    @classmethod
    def field_problems(cls, fields: dict) -> list[tuple[str, str]]:
        problems = []
        span = fields.get("span")
        if isinstance(span, (list, tuple)) and len(span) == 2 and not 1 <= span[0] <= span[1]:
            problems.append(("span", f"{list(span)}: give [shortest, longest] with 1 ≤ shortest ≤ longest."))
        to_mask, to_random = number(fields, "to_mask"), number(fields, "to_random")
        if to_mask is not None and to_random is not None and to_mask + to_random > 1:
            problems.append(("to_random", f"to_mask {to_mask} + to_random {to_random} > 1; lower one of them."))
        return problems


class TrainConfig(Section):
    global_batch_size: int = Field(ge=1, description="sequences per optimizer step, all ranks")
    micro_batch_size: int = Field(ge=1, description="sequences per forward pass on one rank")
    world_size: int | None = Field(None, ge=1, description="expected data-parallel ranks; checked at launch")
    grad_accum_steps: int | None = Field(None, ge=1, description="derived when omitted")
    max_steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_steps: int | None = Field(None, ge=1, description="wsd: length of the final decay (cooldown)")
    decay_shape: Literal["linear", "cosine", "sqrt"] = Field("linear", description="wsd decay curve")
    frozen_body_steps: int = Field(0, ge=0, description="train only embeddings + LM head for this many steps")
    frozen_body_lr: float | None = Field(None, gt=0, description="a constant lr for the frozen-body stage, "
                                         "the schedule then starting after it (NORA 11B's stage 2.2); "
                                         "unset: the schedule runs from step 0 through the stage")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    precision: Literal["fp32", "bf16"] = "bf16"
    max_nonfinite_steps: int = Field(10, ge=1, description="stop after this many optimizer steps with a "
                                     "non-finite loss or gradient norm (their updates are skipped)")
    loss_spike_factor: float = Field(4.0, ge=0, description="a step whose loss exceeds this multiple of its "
                                     "running mean (and by over 1 nat) is anomalous; 0: off (training.loop.guard)")
    grad_norm_spike_factor: float = Field(100.0, ge=0, description="a step whose gradient norm exceeds this "
                                          "multiple of its running mean is anomalous; 0: off")
    anomaly_window_steps: int = Field(20, ge=1, description="the running means follow about this many normal "
                                      "steps; trouble ends after this many normal steps in a row")
    max_anomalous_steps: int = Field(10, ge=1, description="stop after this many anomalous steps (loss spike, "
                                     "gradient norm 0 or exploding) in one stretch of trouble")
    objective: Literal["causal", "hybrid"] = Field("causal", description="hybrid: NORA 11B's mix of causal "
                                                   "and masked samples (train.hybrid; data_pipeline.masking)")
    hybrid: HybridConfig = HybridConfig()
    optimizer: Literal["auto", "torch", "deepspeed"] = Field(
        "auto", description="AdamW implementation; auto: DeepSpeed's CPU Adam with optimizer offload, else torch"
    )
    # Two clocks for a multi-node run (training.liveness): a lost node is found by its missing
    # heartbeats, whatever the other ranks are waiting in; the collective timeout only ends a
    # wait for a rank that is alive but stuck, so it must outlast the longest legitimate one: a
    # 7B save or its universal conversion on rank 0 while the others wait at a barrier.
    collective_timeout_s: int = Field(3600, ge=10, description="a collective (all-reduce, barrier) that waits "
                                      "longer fails the run; also DeepSpeed's own process groups")
    heartbeat_timeout_s: int = Field(120, ge=0, description="a rank whose heartbeat stops for this long is "
                                     "declared lost (its node named) and the job ends for requeue; 0: off")

    def accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * world_size)

    @classmethod
    def field_problems(cls, fields: dict) -> list[tuple[str, str]]:
        """The schedule's steps and rates against each other (the batch arithmetic needs the world
        size too: training.config_checks)."""
        problems = []
        warmup, max_steps = number(fields, "warmup_steps"), number(fields, "max_steps")
        if warmup is not None and max_steps is not None and warmup > max_steps:
            problems.append(("warmup_steps", f"{warmup} > max_steps {max_steps}; lower it."))
        min_lr, lr = number(fields, "min_lr"), number(fields, "lr")
        if min_lr is not None and lr is not None and min_lr > lr:
            problems.append(("min_lr", f"{min_lr} > lr {lr}; the floor must not exceed the peak."))
        if fields.get("schedule") == "wsd":
            decay = number(fields, "decay_steps")
            if decay is None:
                problems.append(("decay_steps", "schedule: wsd needs decay_steps (the cooldown length)."))
            elif max_steps is not None and warmup is not None:
                staged = number(fields, "frozen_body_steps") if fields.get("frozen_body_lr") is not None else 0
                room = max_steps - (staged or 0) - warmup
                if decay > room:
                    what = "max_steps - frozen_body_steps - warmup_steps" if staged else "max_steps - warmup_steps"
                    problems.append(("decay_steps", f"{decay} > {what} = {room}."))
        for key in ("loss_spike_factor", "grad_norm_spike_factor"):
            factor = number(fields, key)
            if factor is not None and 0 < factor <= 1:
                problems.append((key, f"{factor:g} would call every step anomalous; use 0 (off) or a factor above 1."))
        frozen = number(fields, "frozen_body_steps")
        if frozen and max_steps is not None and frozen >= max_steps:
            problems.append(("frozen_body_steps", f"{frozen} ≥ max_steps {max_steps}: the body would never train."))
        if fields.get("frozen_body_lr") is not None and not frozen:
            problems.append(("frozen_body_lr", "is the lr of the frozen-body stage; set frozen_body_steps too, or drop it."))
        hybrid = fields.get("hybrid")
        if isinstance(hybrid, dict):
            problems += [(f"hybrid.{field}", msg) for field, msg in HybridConfig.field_problems(hybrid)]
        return problems


class ZeroConfig(Section):
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool | None = Field(None, description="overlap gradient reduction with the backward "
                                      "pass; default: on for ZeRO-2/3")
    reduce_bucket_size: int = Field(200_000_000, ge=1, description="elements per gradient-reduction bucket")
    allgather_bucket_size: int = Field(200_000_000, ge=1, description="elements per parameter all-gather bucket "
                                       "(ZeRO-1/2)")
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the generated DeepSpeed JSON")


class CheckpointConfig(Section):
    every_steps: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1)
    lock_heartbeat_s: float = Field(30.0, gt=0, description="how often the trainer refreshes RUN_DIR/train.lock")
    lock_stale_s: float = Field(300.0, gt=0, description="another trainer takes the lock over once its "
                                "heartbeat is this old (training.checkpoint.run_lock)")

    @classmethod
    def field_problems(cls, fields: dict) -> list[tuple[str, str]]:
        beat, stale = number(fields, "lock_heartbeat_s"), number(fields, "lock_stale_s")
        if beat is not None and stale is not None and stale < 3 * beat:
            return [("lock_stale_s", f"{stale:g} is under 3 × lock_heartbeat_s ({beat:g}): one slow heartbeat would "
                     f"let another trainer take the lock of a live one; raise it to at least {3 * beat:g}.")]
        return []


class EvalConfig(Section):
    every_steps: int = Field(1000, ge=0, description="0: only at the start and the end")
    max_samples: int = Field(64, ge=1)


class LoggingConfig(Section):
    every_steps: int = Field(1, ge=1)
    wandb: bool = False
    wandb_project: str = "norallm"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    peak_tflops: float | None = Field(None, gt=0, description="per-device peak for the MFU estimate")


# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
SLURM_TIME = r"^(\d+-\d{1,2}(:\d{2}){0,2}|\d+(:\d{2}){0,2})$"


class SlurmConfig(Section):
    """Where and how `norallm submit` runs this experiment; unset fields fall back to the cluster
    profile (training.launch.profiles) or to the command line, which overrides both."""

    account: str | None = Field(None, description="--account (LUMI: project_<id>; Sigma2: nnXXXXk)")
    partition: str | None = Field(None, description="default: the cluster profile's")
    prepare_partition: str | None = Field(None, description="CPU partition of the preparation array job")
    qos: str | None = Field(None, description="--qos, e.g. devel on Sigma2 systems")
    nodes: int = Field(1, ge=1, description="nodes per job")
    time: str | None = Field(None, description="--time per job: minutes, HH:MM:SS or D-HH:MM:SS")
    launcher: Literal["srun", "torchrun"] | None = Field(
        None, description="srun: one task per GPU; torchrun: one task per node (default: the profile's)")
    ranks_per_node: int | None = Field(None, ge=1, description="default: the profile's GPUs per node")
    cpus_per_rank: int | None = Field(None, ge=1, description="default: the profile's")
    container: str | None = Field(None, description="Singularity/Apptainer image the ranks run in")
    binds: list[str] = Field(default_factory=list, description="extra container binds (src[:dst[:opts]])")
    python: str | None = Field(None, description="interpreter on the nodes (in the container, if any)")
    setup: list[str] = Field(default_factory=list, description="shell lines run before launching "
                             "(module load ..., source venv/bin/activate)")
    env: dict[str, str] = Field(default_factory=dict, description="exported in the job over the profile's; "
                                "literal ($(…) and $VARS stay as written) unless named in env_expand")
    env_expand: list[str] = Field(default_factory=list, description="slurm.env names whose values expand "
                                  "$VARS in the job (double-quoted)")
    run_dir: str | None = Field(None, description="default: the cluster's work/scratch area + /<name> "
                                   f"(LUMI /scratch/<account>/$USER/norallm, Sigma2 /cluster/work/...); local: {default_run_dir('<name>')}")
    signal_margin_s: int = Field(300, ge=30, description="USR1 this long before the time limit: save, requeue")
    requeue: bool = Field(True, description="requeue the job after a signal-triggered checkpoint")
    preflight: bool = Field(True, description="run `norallm preflight` on every rank before training")
    prepare_tasks: int = Field(4, ge=1, description="array tasks of the preparation job")
    extra_sbatch: list[str] = Field(default_factory=list, description="more #SBATCH options, e.g. --mail-type=END")

    @field_validator("time", mode="before")
    @classmethod
    def _slurm_time(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)  # minutes
        if isinstance(v, str) and not re.match(SLURM_TIME, v):
            raise ValueError(f"'{v}' is not a Slurm time; write minutes, HH:MM:SS or D-HH:MM:SS")
        return v


class SFTConfig(Section):
    """Present: supervised fine-tuning on conversations (training.data.chat, training.data.sft) instead of
    pretraining. data.sources then name JSONL files of ``messages`` or Alpaca records."""

    chat_template: Literal["normistral"] = Field("normistral", description="NorMistral-7b-warm-instruct's format")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "tokenizer": TokenizerConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "zero": ZeroConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "logging": LoggingConfig,
    "slurm": SlurmConfig,
    "sft": SFTConfig,
}
REQUIRED = ("model", "tokenizer", "data", "train")
SWITCH_SECTIONS = ("sft",)  # present (even empty: {}) turns the mode on; absent or null: off
TOP_LEVEL = ("name", "seed", *SECTIONS)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "run"
    seed: int = 1234
    model: ModelConfig
    tokenizer: TokenizerConfig
    data: DataConfig
    train: TrainConfig
    zero: ZeroConfig = ZeroConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    slurm: SlurmConfig = SlurmConfig()
    sft: SFTConfig | None = None

    @property
    def model_vocab_size(self) -> int:
        return self.model.vocab_size or self.tokenizer.vocab_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step, all ranks (every sample is seq_len positions)."""
        return self.train.global_batch_size * self.data.seq_len

    def to_dict(self) -> dict:
        """The resolved config, as written to config.yaml, checkpoints and wandb: values of
        ``slurm.env`` variables whose names look secret (``is_secret_name``) are replaced by a note."""
        out = self.model_dump(mode="json")
        env = (out.get("slurm") or {}).get("env") or {}
        for name in env:
            if is_secret_name(name):
                env[name] = REDACTED
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _known_names() -> list[str]:
    names = set(TOP_LEVEL)
    for cls in (*SECTIONS.values(), SourceConfig, HybridConfig):
        names.update(cls.model_fields)
    return sorted(names)


def _pydantic_problems(section: str, err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in (section, *e["loc"]))
        key = str(e["loc"][-1]) if e["loc"] else section
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, _known_names(), n=1)
            hint = f" did you mean '{close[0]}'?" if close else " remove it."
            problems.append((path, f"unknown key;{hint}"))
        elif e["type"] == "missing":
            problems.append((path, "required but missing; add it."))
        else:
            problems.append((path, f"{e['msg']} (got {e.get('input')!r})."))
    return problems


def set_override(raw: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML; list items by index: ``data.sources.0.name``)."""
    if "=" not in assignment:
        raise ConfigError([(assignment, "an override must look like key.path=value")], "--set")
    path, value = assignment.split("=", 1)
    path = path.strip()
    keys = path.split(".")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([(path, f"the value is not valid YAML: {e}")], "--set") from None
    node: Any = raw
    try:
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        if isinstance(node, list):
            node[int(keys[-1])] = parsed
        elif isinstance(node, dict):
            node[keys[-1]] = parsed
        else:
            raise TypeError(f"a {type(node).__name__} has no fields")
    except (IndexError, ValueError, TypeError, AttributeError) as e:
        msg = f"cannot set this path ({e}); address list items by an existing index, e.g. data.sources.0.name"
        raise ConfigError([(path, msg)], "--set") from None


def parse_config(raw: Any, source: str = "config", overrides: list[str] | None = None) -> Config:
    """Validate a config dict; raise one ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([("(top level)", "the file must hold a mapping of sections")], source)
    for assignment in overrides or []:
        set_override(raw, assignment)
    problems: list[tuple[str, str]] = resolve_warm_start(raw) + resolve_tokenizer_strategy(raw)
    for key in raw:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), TOP_LEVEL, n=1)
            problems.append((str(key), f"unknown section; {f'did you mean {close[0]!r}?' if close else 'remove it.'}"))
    parsed: dict[str, Section] = {}
    checked: dict[str, dict] = {}  # per section, the fields that passed their own checks
    for name, cls in SECTIONS.items():
        if name not in raw or (raw[name] is None and name in SWITCH_SECTIONS):
            if name in REQUIRED:
                problems.append((name, "required section is missing; add it."))
            continue
        section = raw[name] if raw[name] is not None else {}
        try:
            parsed[name] = cls.model_validate(section)
            checked[name] = parsed[name].model_dump()
        except ValidationError as e:
            problems.extend(_pydantic_problems(name, e))
            if isinstance(section, dict):
                bad = {err["loc"][0] for err in e.errors() if err["loc"]}
                checked[name] = {k: v for k, v in section.items() if k not in bad and k in cls.model_fields}
    for name, fields in checked.items():
        problems += [(f"{name}.{field}", msg) for field, msg in SECTIONS[name].field_problems(fields)]
    problems.extend(consistency(checked))
    for key in ("name", "seed"):
        if key in raw:
            expected = str if key == "name" else int
            if not isinstance(raw[key], expected) or isinstance(raw[key], bool):
                problems.append((key, f"must be {expected.__name__} (got {raw[key]!r})."))
    if problems:
        raise ConfigError(problems, source)
    return Config(**{k: v for k, v in raw.items() if k in ("name", "seed")}, **parsed)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([(str(path), "no such file")], "config") from None
    except yaml.YAMLError as e:
        raise ConfigError([(str(path), f"not valid YAML: {e}")], "config") from None
    return parse_config(raw, str(path), overrides)
