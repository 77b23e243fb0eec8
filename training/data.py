"""Glue between the config's data/tokenizer sections and the data_pipeline package: tokenizer,
prepare (parallel, array tasks, verify), the budget plan, and the training loader."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.loader import SOURCE_PREFIX, WEIGHT_PREFIX, Loader, MixtureWindows, fingerprint
from data_pipeline.mixture import GlobalOrder, window_count
from data_pipeline.plan import Plan, SourceBudget, make_plan
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.shards import open_split, read_manifest, token_dtype
from data_pipeline.sources import BadRecords, is_validation
from data_pipeline.tokenizer import SpecialTokens, Tokenizer, train_bpe
from data_pipeline.units import iter_unit, plan_units
from training.config import Config

# BPE training reads at most this many work units of each source, spread over its files.
_SAMPLE_UNITS = 64


def prepare_options(data: DataConfig, progress: bool = True, workers: int = 1, task_index: int = 0,
                    num_tasks: int = 1) -> PrepareOptions:
    return PrepareOptions(
        valid_fraction=data.valid_fraction,
        max_bad_fraction=data.max_bad_fraction,
        allow_truncated_files=data.allow_truncated_files,
        shard_tokens=data.shard_tokens,
        progress=progress,
        unit_bytes=data.prepare_unit_bytes,
        max_document_bytes=data.max_document_bytes,
        workers=workers,
        task_index=task_index,
        num_tasks=num_tasks,
    )


def _tokenizer_exists(path: Path) -> bool:
    return path.is_file() or (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()


def load_tokenizer(tok: TokenizerConfig) -> Tokenizer:
    """The configured tokenizer (HF tokenizer.json or SentencePiece .model, per tokenizer.kind)."""
    return tok.load()


def _round_robin(iterators: list[Iterator]) -> Iterator:
    iterators = list(iterators)
    while iterators:
        for it in list(iterators):
            item = next(it, None)
            if item is None:
                iterators.remove(it)
            else:
                yield item


def training_sample(data: DataConfig, n_documents: int) -> Iterator[str]:
    """Up to ``n_documents`` training texts (never validation documents), taken round-robin over
    the sources and, within a source, over up to 64 work units spread across its files."""
    sources = {s.name: s for s in data.sources}
    per_source = []
    for spec in data.sources:
        units = plan_units(spec, data.prepare_unit_bytes)
        picked = units[:: max(1, len(units) // _SAMPLE_UNITS)][:_SAMPLE_UNITS]
        per_source.append(_round_robin([iter_unit(spec, u, BadRecords()) for u in picked]))
    n = 0
    for doc in _round_robin(per_source):
        if not is_validation(doc.text, sources[doc.source].valid_fraction_or(data.valid_fraction)):
            yield doc.text
            n += 1
            if n >= n_documents:
                return


def ensure_tokenizer(tok: TokenizerConfig, data: DataConfig) -> Tokenizer:
    """Load the configured tokenizer, training a byte-level BPE first when ``tokenizer.train`` and
    it is missing, on up to ``tokenizer.train_documents`` sampled training documents."""
    path = Path(tok.path)
    if _tokenizer_exists(path):
        return load_tokenizer(tok)
    if not tok.train:
        raise DataError(
            f"tokenizer.path '{path}' holds no tokenizer.json or tokenizer.model. Point it at an HF tokenizer "
            "dir or a SentencePiece .model, or set tokenizer.train: true to train one there."
        )
    special = SpecialTokens(bos=tok.bos_token, eos=tok.eos_token, pad=tok.pad_token)
    trained = train_bpe(training_sample(data, tok.train_documents), path, tok.vocab_size, special, tok.min_frequency)
    print(f"[tokenizer] trained byte-level BPE with {trained.vocab_size} entries → {path}")
    return trained


def run_prepare(cfg: Config, progress: bool = True, workers: int = 1, task_index: int = 0,
                num_tasks: int = 1) -> list[dict]:
    """Tokenize this task's share of the sources; returns the manifests of the complete sources."""
    if num_tasks > 1 and not _tokenizer_exists(Path(cfg.tokenizer.path)):
        raise DataError(
            f"tokenizer '{cfg.tokenizer.path}' does not exist yet: train it once with `norallm tokenizer "
            "CONFIG` before the array job (each array task would otherwise train its own)."
        )
    tokenizer = ensure_tokenizer(cfg.tokenizer, cfg.data)
    opts = prepare_options(cfg.data, progress, workers, task_index, num_tasks)
    return prepare(cfg.data.sources, tokenizer, cfg.data.shards_dir, opts)


def verify_prepared(cfg: Config, workers: int = 1) -> list[str]:
    """Check the union of all prepare tasks (data_pipeline.verify); DataError listing problems."""
    from data_pipeline.verify import verify

    tokenizer = load_tokenizer(cfg.tokenizer)
    return verify(cfg.data.sources, tokenizer, cfg.data.shards_dir, prepare_options(cfg.data, False, workers))


def _bytes_per_token(cfg: Config) -> int:
    return token_dtype(cfg.model_vocab_size).itemsize


def source_budgets(cfg: Config) -> list[SourceBudget]:
    """Per source: unique train tokens from its manifest, else its declared unique_tokens."""
    budgets = []
    for s in cfg.data.sources:
        m = read_manifest(cfg.data.shards_dir, s.name)
        if m is not None:
            itemsize = token_dtype(m["vocab_size"]).itemsize if "vocab_size" in m else 2
            docs = m["documents"]["train"] + m["documents"]["valid"]
            disk = (m["tokens"]["train"] + m["tokens"]["valid"]) * itemsize + 8 * (docs + len(m["shards"]))
            unique, basis = m["tokens"]["train"], "manifest"
        elif s.unique_tokens is not None:
            valid = s.valid_fraction_or(cfg.data.valid_fraction)
            unique, basis = s.unique_tokens, "declared"
            disk = int(unique / (1 - valid) * _bytes_per_token(cfg))
        else:
            raise DataError(
                f"source '{s.name}' has no shards under {cfg.data.shards_dir} and no declared size: run "
                f"`norallm prepare`, or set data.sources[{s.name}].unique_tokens for a plan before preparing."
            )
        budgets.append(SourceBudget(s, unique, basis, disk))
    return budgets


def data_plan(cfg: Config) -> Plan:
    """The budget plan for ``train.max_steps`` steps (problems listed in ``plan.problems``)."""
    return make_plan(source_budgets(cfg), cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.max_steps,
                     cfg.data.gpu_throughput_tokens_per_s)


def fingerprint_parts(cfg: Config, tokenizer: Tokenizer, plan: Plan) -> dict[str, str]:
    """What defines the samples and their order, part by part (so a mismatch can be named)."""
    parts = {"tokenizer": tokenizer.fingerprint, "seed": str(cfg.seed), "seq_len": str(cfg.data.seq_len),
             "shuffle": str(cfg.data.shuffle)}
    for s in cfg.data.sources:
        m = read_manifest(cfg.data.shards_dir, s.name) or {}
        parts[SOURCE_PREFIX + s.name] = fingerprint(shards=[sh["sha256"] for sh in m.get("shards", [])
                                                            if sh["split"] == "train"])
    for line in plan.sources:
        parts[WEIGHT_PREFIX + line.name] = str(line.weight)
    return parts


def document_eos(data: DataConfig, tokenizer: Tokenizer) -> int | None:
    """The token that ends each packed document when documents attend only to themselves
    (data.document_boundaries), else None: plain causal attention over the window."""
    return tokenizer.eos_id if data.document_boundaries else None


def build_loader(cfg: Config, tokenizer: Tokenizer, rank: int, world_size: int) -> Loader:
    """This rank's loader over the mixture of all sources' train splits. Refuses a plan that
    repeats a source beyond its max_epochs."""
    plan = data_plan(cfg)
    plan.check()
    streams = {s.name: open_split(cfg.data.shards_dir, [s.name], "train", tokenizer.fingerprint)
               for s in cfg.data.sources}
    windows = {name: window_count(st.total_tokens, cfg.data.seq_len) for name, st in streams.items()}
    order = GlobalOrder.single(windows, plan.weights(), cfg.seed, cfg.data.shuffle)
    parts = fingerprint_parts(cfg, tokenizer, plan)
    source = MixtureWindows(streams, order, cfg.data.seq_len, document_eos(cfg.data, tokenizer), fingerprint(**parts),
                            parts, cfg.data.allow_mixture_change)
    return Loader(source, cfg.train.global_batch_size, cfg.train.micro_batch_size, rank, world_size)
