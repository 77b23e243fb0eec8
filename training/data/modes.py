"""What a config trains on: prepared pretraining shards, or conversations for supervised
fine-tuning (a config with an ``sft`` section). This is the one place that tells the two apart;
the CLI and the trainer ask the mode for the tokenizer, the data and the model rows, and neither
branches on ``cfg.sft``. Importing it does not import torch (`norallm plan`, `tokenizer`, `prepare`
and `submit` stay light): what needs torch is imported where it is used.

Both modes give the trainer the same things — a ``data_pipeline.loader.Loader`` of
``data_pipeline.batch.Batch`` and the validation sets — so the loop does not know which it runs.
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.plan import Plan
from data_pipeline.tokenizer import Tokenizer
from norallm.errors import NorallmError
from training.config import Config, ConfigError
from training.data.dedup import ensure_current as ensure_dedup_current
from training.data.pretraining import (
    build_loader,
    data_plan,
    ensure_tokenizer,
    hybrid_masking,
    hybrid_source,
    run_prepare,
    verify_prepared,
)
from training.data.sft import build_sft, ensure_chat_tokenizer


class Pretraining:
    """Windows of the prepared token shards, mixed as the budget plan says (training.data.pretraining)."""

    reads_shards = True  # `norallm prepare` writes them before training

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @property
    def masks_documents(self) -> bool:
        """Whether each packed document attends only to itself (data.document_boundaries)."""
        return self.cfg.data.document_boundaries

    def ensure_tokenizer(self) -> Tokenizer:
        """The configured tokenizer, trained first when ``tokenizer.train`` and it is missing."""
        return ensure_tokenizer(self.cfg.tokenizer, self.cfg.data)

    def training_tokenizer(self, rank: int) -> Tokenizer:
        """The tokenizer the shards were prepared with (`norallm prepare` made it)."""
        return self.cfg.tokenizer.load()

    def sized(self, tokenizer: Tokenizer) -> Config:
        """The config whose model has rows for every token (pretraining: as configured, else refused)."""
        rows = self.cfg.model_vocab_size
        if tokenizer.vocab_size > rows:
            raise ConfigError([("model.vocab_size", f"the tokenizer has {tokenizer.vocab_size} entries, more than "
                                f"the model's {rows} embedding rows.")], "tokenizer")
        return self.cfg

    def plan(self) -> Plan:
        """The budget plan of train.max_steps steps of the global batch (training.data.pretraining.data_plan)."""
        c = self.cfg
        return data_plan(c.data, c.train.global_batch_size, c.train.max_steps, c.model_vocab_size)

    def prepare(self, verify: bool = False, progress: bool = True, workers: int = 1, task_index: int = 0,
                num_tasks: int = 1) -> list[str]:
        """`norallm prepare`: tokenize this task's share of the sources into shards (or, with
        ``verify``, check the shards against their manifests); one line per source."""
        c = self.cfg
        if verify:
            return [f"ok {line}" for line in verify_prepared(c.tokenizer, c.data, workers=workers)]
        ensure_dedup_current(c.data, progress, workers, num_tasks)
        manifests = run_prepare(c.tokenizer, c.data, progress=progress, workers=workers, task_index=task_index,
                                num_tasks=num_tasks)
        return [f"{m['source']}: {m['documents']['train']:,} train / {m['documents']['valid']:,} valid documents, "
                f"{m['tokens']['train']:,} / {m['tokens']['valid']:,} tokens" for m in manifests]

    def data(self, tokenizer: Tokenizer, rank: int, world_size: int):
        """(this rank's training loader, validation sets)."""
        from training.eval.perplexity import validation_sets

        c = self.cfg
        loader = build_loader(c.data, tokenizer, self.plan(), c.seed, c.train.micro_batch_size, rank, world_size)
        if c.train.objective == "hybrid":
            masking = hybrid_masking(c.train.hybrid, tokenizer, c.data, c.seed, c.train.global_batch_size)
            loader = hybrid_source(loader, masking)
        return loader, validation_sets(c.data, tokenizer, c.eval.max_samples, rank, world_size)


class FineTuning:
    """Whole conversations packed into rows at train time (training.data.sft), the loss on the
    assistant's tokens; the tokenizer is the base model's with the chat tokens added."""

    masks_documents = True  # each conversation of a packed row attends only to itself
    reads_shards = False  # the training job reads the conversation files itself

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def _base_tokenizer(self) -> Path:
        base = Path(self.cfg.model.base_tokenizer or self.cfg.model.base or "")
        if not (Path(self.cfg.tokenizer.path) / "tokenizer.json").is_file() and not base.is_dir():
            raise ConfigError([("model.base", f"'{base}' is not a directory: SFT starts from an exported "
                                "model (`norallm export RUN OUT`) whose tokenizer gains the chat tokens.")], "sft")
        return base

    def ensure_tokenizer(self) -> Tokenizer:
        """The chat tokenizer at tokenizer.path, built from the base model's once."""
        return ensure_chat_tokenizer(self.cfg.tokenizer.path, self._base_tokenizer())

    def training_tokenizer(self, rank: int) -> Tokenizer:
        """The chat tokenizer, built by rank 0 if missing (collective)."""
        from training import distributed

        base = self._base_tokenizer()  # every rank: the same error everywhere
        if rank == 0:
            ensure_chat_tokenizer(self.cfg.tokenizer.path, base)
        distributed.barrier()
        return self.cfg.tokenizer.load()

    def sized(self, tokenizer: Tokenizer) -> Config:
        """The config whose model has a row for every chat token: the added ``<|im_start|>`` /
        ``<|im_end|>`` grow ``model.vocab_size`` past the base's, and the resolved value is what
        config.yaml records, so that resume and export build the same shape."""
        if tokenizer.vocab_size <= self.cfg.model_vocab_size:
            return self.cfg
        model = self.cfg.model.model_copy(update={"vocab_size": tokenizer.vocab_size})
        return self.cfg.model_copy(update={"model": model})

    def plan(self) -> Plan:
        raise NorallmError("an SFT config has no budget plan: its conversations are packed at train time. "
                           "`norallm prepare CONFIG` reports how many would be kept.")

    def prepare(self, verify: bool = False, progress: bool = True, workers: int = 1, task_index: int = 0,
                num_tasks: int = 1) -> list[str]:
        """`norallm prepare`: nothing to write (conversations are read and packed at train time);
        the conversation report says what training would keep."""
        self.data(self.cfg.tokenizer.load(), rank=0, world_size=1)
        return []

    def data(self, tokenizer: Tokenizer, rank: int, world_size: int, log=print):
        """(this rank's loader over the packed conversations, the held-out conversations); the
        conversation report is printed on rank 0."""
        c = self.cfg
        return build_sft(c.data, tokenizer, c.seed, c.train.global_batch_size, c.train.micro_batch_size,
                         c.eval.max_samples, rank, world_size, log)


def mode_of(cfg: Config) -> Pretraining | FineTuning:
    return FineTuning(cfg) if cfg.sft is not None else Pretraining(cfg)
