"""The fertility (tokens per word) of a warm start's base tokenizer and of the tokenizer it will
train on, on a sample of the training corpus: what `norallm plan` shows so a user can choose
model.tokenizer_strategy with a number (a base tokenizer that splits the target language's words
into many pieces costs compute per word and context per document)."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.extend import fertility
from data_pipeline.tokenizer import Tokenizer
from training.config import Config
from training.data.pretraining import training_sample

SAMPLE_DOCUMENTS = 200


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file() or path.is_file()


def tokenizer_fertility(cfg: Config, n_documents: int = SAMPLE_DOCUMENTS) -> dict[str, float | str] | None:
    """{"base": tokens per word, "new": tokens per word (or why not measured), "documents": n} on up
    to ``n_documents`` training documents; None when the config is no warm start or its base
    tokenizer is not readable here."""
    if cfg.model.init != "warm":
        return None
    base = Path(cfg.model.base_tokenizer or cfg.model.base)
    if not _has_tokenizer(base):
        return None
    texts = list(training_sample(cfg.data, n_documents))
    out: dict[str, float | str] = {"documents": len(texts), "base": round(fertility(Tokenizer(base), texts), 3)}
    new = Path(cfg.tokenizer.path)
    out["new"] = (round(fertility(cfg.tokenizer.load(), texts), 3) if _has_tokenizer(new)
                  else "not trained yet (norallm tokenizer CONFIG)")
    return out
