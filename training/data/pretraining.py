"""Glue between the config's data/tokenizer sections and the data_pipeline package: tokenizer,
prepare (parallel, array tasks, verify), the budget plan, and the training loader. Each function
takes the sections it uses, and what it needs of the others as plain values."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import DataConfig, TokenizerConfig
from data_pipeline.errors import DataError
from data_pipeline.extend import extend_bpe
from data_pipeline.loader import SOURCE_PREFIX, WEIGHT_PREFIX, Loader, MixtureWindows, fingerprint
from data_pipeline.masking import HybridWindows, SpanMasking
from data_pipeline.mixture import GlobalOrder, window_count
from data_pipeline.plan import Plan, SourceBudget, make_plan
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.shards import open_split, read_manifest, token_dtype
from data_pipeline.sources import BadRecords, is_validation
from data_pipeline.tokenizer import SpecialTokens, Tokenizer, train_bpe
from data_pipeline.units import iter_unit, plan_units

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
        dedup_dir=data.dedup_dir(),
    )


def _tokenizer_exists(path: Path) -> bool:
    return path.is_file() or (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()


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
        return tok.load()
    if not tok.train:
        raise DataError(
            f"tokenizer.path '{path}' holds no tokenizer.json or tokenizer.model. Point it at an HF tokenizer "
            "dir or a SentencePiece .model, or set tokenizer.train: true to train one there."
        )
    if tok.extend_from is not None:  # model.tokenizer_strategy: extend
        size = extend_bpe(tok.extend_from, training_sample(data, tok.train_documents), tok.extend_tokens, path)
        print(f"[tokenizer] extended {tok.extend_from} by {tok.extend_tokens} tokens to {size} entries → {path}")
        return tok.load()
    special = SpecialTokens(bos=tok.bos_token, eos=tok.eos_token, pad=tok.pad_token)
    trained = train_bpe(training_sample(data, tok.train_documents), path, tok.vocab_size, special, tok.min_frequency,
                        extra_special=tok.extra_special_tokens, normalizer=tok.normalizer,
                        split_digits=tok.split_digits, max_token_length=tok.max_token_length)
    print(f"[tokenizer] trained byte-level BPE with {trained.vocab_size} entries → {path}")
    return trained


def run_prepare(tok: TokenizerConfig, data: DataConfig, progress: bool = True, workers: int = 1,
                task_index: int = 0, num_tasks: int = 1) -> list[dict]:
    """Tokenize this task's share of the sources; returns the manifests of the complete sources."""
    if num_tasks > 1 and not _tokenizer_exists(Path(tok.path)):
        raise DataError(
            f"tokenizer '{tok.path}' does not exist yet: train it once with `norallm tokenizer "
            "CONFIG` before the array job (each array task would otherwise train its own)."
        )
    tokenizer = ensure_tokenizer(tok, data)
    opts = prepare_options(data, progress, workers, task_index, num_tasks)
    return prepare(data.sources, tokenizer, data.shards_dir, opts)


def verify_prepared(tok: TokenizerConfig, data: DataConfig, workers: int = 1) -> list[str]:
    """Check the union of all prepare tasks (data_pipeline.verify); DataError listing problems."""
    from data_pipeline.verify import verify

    tokenizer = tok.load()
    return verify(data.sources, tokenizer, data.shards_dir, prepare_options(data, False, workers))


def source_budgets(data: DataConfig, vocab_size: int) -> list[SourceBudget]:
    """Per source: unique train tokens from its manifest, else its declared unique_tokens (the disk
    estimate of a declared source stores tokens for ``vocab_size`` embedding rows)."""
    budgets = []
    for s in data.training_sources:
        m = read_manifest(data.shards_dir, s.name)
        if m is not None:
            itemsize = token_dtype(m["vocab_size"]).itemsize if "vocab_size" in m else 2
            docs = m["documents"]["train"] + m["documents"]["valid"]
            disk = (m["tokens"]["train"] + m["tokens"]["valid"]) * itemsize + 8 * (docs + len(m["shards"]))
            unique, basis = m["tokens"]["train"], "manifest"
            removed = m.get("removed", {})
        elif s.unique_tokens is not None:
            valid = s.valid_fraction_or(data.valid_fraction)
            unique, basis, removed = s.unique_tokens, "declared", {}
            disk = int(unique / (1 - valid) * token_dtype(vocab_size).itemsize)
        else:
            raise DataError(
                f"source '{s.name}' has no shards under {data.shards_dir} and no declared size: run "
                f"`norallm prepare`, or set data.sources[{s.name}].unique_tokens for a plan before preparing."
            )
        budgets.append(SourceBudget(s, unique, basis, disk, removed))
    return budgets


def data_plan(data: DataConfig, global_batch_size: int, steps: int, vocab_size: int) -> Plan:
    """The budget plan for ``steps`` optimizer steps (train.max_steps) of ``global_batch_size``
    sequences; problems are listed in ``plan.problems``."""
    return make_plan(source_budgets(data, vocab_size), data.seq_len, global_batch_size, steps,
                     data.gpu_throughput_tokens_per_s)


def fingerprint_parts(data: DataConfig, seed: int, tokenizer: Tokenizer, plan: Plan) -> dict[str, str]:
    """What defines the samples and their order, part by part (so a mismatch can be named)."""
    parts = {"tokenizer": tokenizer.fingerprint, "seed": str(seed), "seq_len": str(data.seq_len),
             "shuffle": str(data.shuffle)}
    for s in data.training_sources:
        m = read_manifest(data.shards_dir, s.name) or {}
        parts[SOURCE_PREFIX + s.name] = fingerprint(shards=[sh["sha256"] for sh in m.get("shards", [])
                                                            if sh["split"] == "train"])
    for line in plan.sources:
        parts[WEIGHT_PREFIX + line.name] = str(line.weight)
    return parts


def document_eos(data: DataConfig, tokenizer: Tokenizer) -> int | None:
    """The token that ends each packed document when documents attend only to themselves
    (data.document_boundaries), else None: plain causal attention over the window."""
    return tokenizer.eos_id if data.document_boundaries else None


def build_loader(data: DataConfig, tokenizer: Tokenizer, plan: Plan, seed: int, micro_batch_size: int, rank: int,
                 world_size: int) -> Loader:
    """This rank's loader over the mixture of all sources' train splits, weighted and batched as
    ``plan`` (data_plan) says. Refuses a plan that repeats a source beyond its max_epochs."""
    plan.check()
    streams = {s.name: open_split(data.shards_dir, [s.name], "train", tokenizer.fingerprint)
               for s in data.training_sources}
    windows = {name: window_count(st.total_tokens, data.seq_len) for name, st in streams.items()}
    order = GlobalOrder.single(windows, plan.weights(), seed, data.shuffle)
    parts = fingerprint_parts(data, seed, tokenizer, plan)
    source = MixtureWindows(streams, order, data.seq_len, document_eos(data, tokenizer), fingerprint(**parts),
                            parts, data.allow_mixture_change)
    return Loader(source, plan.global_batch_size, micro_batch_size, rank, world_size)


def hybrid_masking(hybrid, tokenizer: Tokenizer, data: DataConfig, seed: int, global_batch_size: int) -> SpanMasking:
    """``train.hybrid``'s masking (data_pipeline.masking) with the tokenizer's ids: its mask token
    (refused when missing), and random replacements drawn from the ids after the special tokens
    that open the vocabulary (pad, bos, eos and the extra specials of a trained BPE); with
    ``unit: batch`` each global batch of ``global_batch_size`` samples is masked or not as one."""
    from training.config import ConfigError

    mask_id = tokenizer.token_id(hybrid.mask_token)
    if mask_id is None:
        raise ConfigError([("train.hybrid.mask_token", f"'{hybrid.mask_token}' is not a token of the tokenizer "
                            f"at {tokenizer.path}; list it in tokenizer.extra_special_tokens before the tokenizer "
                            "is trained, or name a token it has.")], "tokenizer")
    specials = tokenizer.special_ids() | {mask_id}
    low = 0
    while low in specials:
        low += 1
    return SpanMasking(mask_id, (low, tokenizer.vocab_size), document_eos(data, tokenizer), seed,
                       hybrid.masked_fraction, hybrid.mask_ratio, tuple(hybrid.span), hybrid.to_mask,
                       hybrid.to_random, global_batch_size if hybrid.unit == "batch" else None)


def hybrid_source(loader: Loader, masking: SpanMasking) -> Loader:
    """The loader with a fraction of its samples masked (train.objective: hybrid)."""
    loader.source = HybridWindows(loader.source, masking)
    return loader
