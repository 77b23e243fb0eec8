"""A base model's BPE tokenizer extended by new tokens learned on the target corpus, and the
fertility (tokens per word) of a tokenizer on a corpus sample.

Extending keeps every base token at its id and every base merge at its rank: new merges are
appended after the base's, so text the base tokenised is tokenised the same way except where a
new merge applies. The candidates come from a BPE trained on the corpus with the base's own
normalizer and pre-tokenizer, in its merge order (most frequent first); a candidate is taken when
both its parts are already in the (extended) vocabulary and it is not, until ``n_new`` are taken.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from data_pipeline.errors import DataError

# Files of an HF tokenizer dir besides tokenizer.json that transformers reads with it.
_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _merge_pair(merge) -> tuple[str, str]:
    """A tokenizer.json merge, written as "a b" (older files) or ["a", "b"]."""
    if isinstance(merge, str):
        a, b = merge.split(" ", 1)
        return a, b
    return merge[0], merge[1]


def _corpus_merges(base_file: Path, texts: list[str], vocab_size: int) -> list[tuple[str, str]]:
    """The merges of a BPE of ``vocab_size`` entries trained on ``texts`` the way the base splits text."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    base = HFTokenizer.from_file(str(base_file))
    tok = HFTokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer = base.normalizer, base.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return [_merge_pair(m) for m in json.loads(tok.to_str())["model"]["merges"]]


def extend_bpe(base_dir: str | Path, texts: Iterable[str], n_new: int, out_dir: str | Path) -> int:
    """Write the base's tokenizer with ``n_new`` tokens learned on ``texts`` appended to ``out_dir``;
    returns its vocabulary size (with added tokens). A base that is not a BPE tokenizer.json, or a
    corpus that yields fewer new tokens, is an error saying so."""
    base_dir = Path(base_dir)
    base_file = base_dir / "tokenizer.json"
    if not base_file.is_file():
        raise DataError(f"tokenizer extension needs the base's tokenizer.json in '{base_dir}' (a SentencePiece "
                        "tokenizer.model cannot be extended here); use tokenizer_strategy keep or replace.")
    spec = json.loads(base_file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise DataError(f"the base tokenizer in '{base_dir}' is a {model.get('type')} model; only a BPE "
                        "tokenizer.json can be extended. Use tokenizer_strategy keep or replace.")
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    as_pairs = bool(merges) and not isinstance(merges[0], str)
    next_id = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    texts = list(texts)
    added: list[str] = []
    corpus_size = len(vocab) + 4 * n_new
    seen: set[tuple[str, str]] = set()
    for _ in range(4):  # a larger corpus BPE when too few of its tokens extend the base
        for a, b in _corpus_merges(base_file, texts, corpus_size):
            if len(added) == n_new:
                break
            if (a, b) in seen or a + b in vocab or a not in vocab or b not in vocab:
                continue
            seen.add((a, b))
            vocab[a + b] = next_id
            next_id += 1
            merges.append([a, b] if as_pairs else f"{a} {b}")
            added.append(a + b)
        if len(added) == n_new:
            break
        corpus_size *= 2
    if len(added) < n_new:
        raise DataError(f"the corpus sample yields only {len(added)} new tokens that extend the base tokenizer, "
                        f"fewer than the {n_new} asked for; lower model.extend_tokens or sample more documents "
                        "(tokenizer.train_documents).")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    for name in _COMPANIONS:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    return next_id


def fertility(tokenizer, texts: Iterable[str]) -> float:
    """Tokens per whitespace-separated word of ``texts`` under ``tokenizer`` (a data_pipeline
    Tokenizer): how many pieces a word costs, the number to compare tokenizers by on one corpus."""
    tokens = words = 0
    for text in texts:
        words += len(text.split())
        tokens += len(tokenizer.encode(text))
    if words == 0:
        raise DataError("the corpus sample has no words to measure tokenizer fertility on.")
    return tokens / words
