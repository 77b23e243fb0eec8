"""Glue between the config's data/tokenizer sections and the data_pipeline package."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.loader import PackedLoader, fingerprint
from data_pipeline.prepare import PrepareOptions, prepare
from data_pipeline.shards import open_split, read_manifest
from data_pipeline.sources import SourceSpec, is_validation, iter_documents
from data_pipeline.tokenizer import SpecialTokens, Tokenizer, train_bpe
from training.config import Config, DataConfig, TokenizerConfig


def source_specs(data: DataConfig) -> list[SourceSpec]:
    return [SourceSpec(s.name, tuple(s.paths), s.format, s.text_field, s.language) for s in data.sources]


def prepare_options(data: DataConfig, progress: bool = True) -> PrepareOptions:
    return PrepareOptions(
        valid_fraction=data.valid_fraction,
        max_bad_fraction=data.max_bad_fraction,
        shard_tokens=data.shard_tokens,
        progress=progress,
    )


def ensure_tokenizer(tok: TokenizerConfig, data: DataConfig) -> Tokenizer:
    """Load the configured tokenizer, training it first when ``tokenizer.train`` and it is missing.

    Training samples the sources round-robin (never validation documents) up to
    ``tokenizer.train_documents``.
    """
    path = Path(tok.path)
    if (path / "tokenizer.json").is_file():
        return Tokenizer(path)
    if not tok.train:
        raise DataError(
            f"tokenizer.path '{path}' holds no tokenizer.json. Point it at an HF tokenizer dir, or set "
            "tokenizer.train: true to train one there."
        )
    iters = [iter_documents(spec) for spec in source_specs(data)]

    def sample():
        n = 0
        while iters and n < tok.train_documents:
            for it in list(iters):
                doc = next(it, None)
                if doc is None:
                    iters.remove(it)
                elif not is_validation(doc.text, data.valid_fraction):
                    n += 1
                    yield doc.text

    special = SpecialTokens(bos=tok.bos_token, eos=tok.eos_token, pad=tok.pad_token)
    trained = train_bpe(sample(), path, tok.vocab_size, special, tok.min_frequency)
    print(f"[tokenizer] trained byte-level BPE with {trained.vocab_size} entries → {path}")
    return trained


def run_prepare(cfg: Config, progress: bool = True) -> list[dict]:
    tokenizer = ensure_tokenizer(cfg.tokenizer, cfg.data)
    return prepare(source_specs(cfg.data), tokenizer, cfg.data.shards_dir, prepare_options(cfg.data, progress))


def data_fingerprint(cfg: Config, tokenizer: Tokenizer) -> str:
    manifests = []
    for s in cfg.data.sources:
        m = read_manifest(cfg.data.shards_dir, s.name) or {}
        manifests.append([s.name, [sh["sha256"] for sh in m.get("shards", [])]])
    return fingerprint(
        manifests=manifests, tokenizer=tokenizer.fingerprint, seed=cfg.seed, seq_len=cfg.data.seq_len,
        shuffle=cfg.data.shuffle,
    )


def build_loader(cfg: Config, tokenizer: Tokenizer, rank: int, world_size: int) -> PackedLoader:
    names = [s.name for s in cfg.data.sources]
    stream = open_split(cfg.data.shards_dir, names, "train", tokenizer.fingerprint)
    return PackedLoader(
        stream, cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.micro_batch_size,
        rank=rank, world_size=world_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
        fingerprint=data_fingerprint(cfg, tokenizer),
    )


def open_valid(cfg: Config, tokenizer: Tokenizer):
    names = [s.name for s in cfg.data.sources]
    return open_split(cfg.data.shards_dir, names, "valid", tokenizer.fingerprint)
