"""Validation loss and perplexity, per source and per language.

During training: the held-out split of every source (hash-based, see data_pipeline.sources),
evaluated every ``eval.every_steps`` and written to ``eval.jsonl``. On demand:
``norallm eval MODEL_DIR --data [NAME=]PATH ...`` on an exported HF model dir.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from data_pipeline.batch import IGNORE, Batch
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.loader import eval_samples
from data_pipeline.shards import open_split
from data_pipeline.tokenizer import Tokenizer
from norallm.errors import NorallmError
from training import distributed
from training.data.pretraining import document_eos
from training.model.loss import batch_inputs, causal_lm_loss, on_device


def validation_sets(data: DataConfig, tokenizer: Tokenizer, max_samples: int, rank: int,
                    world_size: int) -> list[tuple[str, str, Batch]]:
    """(source, language, this rank's windows) for every source with a validation split, at most
    ``max_samples`` (eval.max_samples) windows of each."""
    sets = []
    for s in data.sources:
        stream = open_split(data.shards_dir, [s.name], "valid", tokenizer.fingerprint)
        batch = eval_samples(stream, data.seq_len, max_samples, rank, world_size, document_eos(data, tokenizer))
        if len(batch):
            sets.append((s.name, s.language or s.name, batch))
    return sets


@torch.no_grad()
def _sum_loss(model, batch: Batch, micro_batch: int, device) -> torch.Tensor:
    """(loss · tokens, tokens) summed over this rank's rows, kept on ``device`` (no sync per batch)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(batch), micro_batch):
        part = batch[i : i + micro_batch]
        n = part.trained_tokens  # on the host
        part = on_device(part) if torch.device(device).type != "cpu" else part.map(torch.from_numpy)
        total[0] += causal_lm_loss(model, part).double() * n
        total[1] += n
    return total


@torch.no_grad()
def _masked_sums(model, batch: Batch, masking, micro_batch: int, device) -> torch.Tensor:
    """(loss · targets, correct, targets) of the masked objective over this rank's rows, every
    row masked (train.objective: hybrid): the loss and the argmax accuracy on the corrupted
    positions, with logits for those positions only. Each window's masking depends on its tokens
    alone (sample index 0 for all), so the figure does not depend on the number of ranks."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    total = torch.zeros(3, dtype=torch.float64, device=device)
    masked = masking.apply(batch, [0] * len(batch), every_row=True)
    for i in range(0, len(masked), micro_batch):
        part = masked[i : i + micro_batch]
        part = on_device(part) if torch.device(device).type != "cpu" else part.map(torch.from_numpy)
        hidden = inner.base_model(**batch_inputs(inner, part)).last_hidden_state  # (B, T, H)
        chosen = part.labels != IGNORE
        logits, targets = head(hidden[chosen]).float(), part.labels[chosen]  # (n, V), (n,)
        total[0] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        total[1] += (logits.argmax(-1) == targets).sum()
        total[2] += targets.numel()
    return total


def _row(step, source, language, total) -> dict:
    loss = float(total[0] / total[1]) if total[1] else float("nan")
    return {"step": step, "split": "valid", "source": source, "language": language, "loss": loss,
            "ppl": math.exp(min(loss, 50.0)), "tokens": int(total[1])}


def evaluate(model, sets: list[tuple[str, str, Batch]], micro_batch: int, step: int, device="cpu",
             masking=None) -> list[dict]:
    """Token-weighted losses over all ranks: one row per source, per language, and ``all``; with
    ``masking`` (train.objective: hybrid) each source's row also holds ``masked_loss`` and
    ``masked_accuracy`` on its windows with every row masked. Every rank must call this (ZeRO-3
    forwards and the reductions are collective)."""
    was_training = model.training
    model.eval()
    per_source, masked = {}, {}
    for name, language, batch in sets:
        per_source[(name, language)] = distributed.sum_(_sum_loss(model, batch, micro_batch, device)).cpu()
        if masking is not None:  # the masked half of the hybrid objective
            masked[name] = distributed.sum_(_masked_sums(model, batch, masking, micro_batch, device)).tolist()
    if was_training:
        model.train()
    rows_out = [_row(step, name, lang, t) for (name, lang), t in per_source.items()]
    for row in rows_out:
        if row["source"] in masked:
            loss_sum, correct, n = masked[row["source"]]
            row.update(masked_loss=loss_sum / n if n else None, masked_accuracy=correct / n if n else None,
                       masked_tokens=int(n))
    by_lang: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(2, dtype=torch.float64))
    for (_, lang), t in per_source.items():
        by_lang[lang] += t
    if len({lang for _, lang in per_source}) < len(per_source):  # a language spans several sources
        rows_out += [_row(step, "*", lang, t) for lang, t in by_lang.items()]
    if per_source:
        rows_out.append(_row(step, "all", "all", sum(per_source.values())))
    return rows_out


def default_seq_len(model_dir: Path) -> int:
    """The sequence length the model was trained at (``training_config.yaml`` beside an export),
    else its ``max_position_embeddings``, else 2048 (BLOOM has no limit of its own)."""
    import json

    import yaml

    trained = model_dir / "training_config.yaml"
    if trained.is_file():
        seq_len = ((yaml.safe_load(trained.read_text(encoding="utf-8")) or {}).get("data") or {}).get("seq_len")
        if isinstance(seq_len, int):
            return seq_len
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or 2048)


def document_prefix_id(model_dir: Path, tokenizer) -> int:
    """The token a document is scored after: ``</s>`` for a norallm export (training puts it
    between documents and never adds ``<s>``), else ``<s>`` where the tokenizer has one, as
    lm-evaluation-harness does."""
    if (model_dir / "training_config.yaml").is_file() or tokenizer.bos_id is None:
        return tokenizer.eos_id
    return tokenizer.bos_id


def document_windows(n: int, max_len: int) -> list[tuple[int, int, int]]:
    """Windows over ``[prefix] + n tokens`` that predict every token once, each from up to
    ``max_len`` tokens of context, as lm-evaluation-harness's rolling loglikelihood does:
    ``(start, stop, scored)``: inputs ``seq[start:stop]`` predict ``seq[start + 1:stop + 1]``, of
    which the last ``scored`` count. The first window starts at the prefix; a later one ends at its
    last target and reaches back as far as ``max_len`` allows."""
    first = min(max_len, n)
    windows, done = [(0, first, first)], first
    while done < n:
        scored = min(n - done, max_len)
        end = done + scored
        windows.append((end - max_len, end, scored))
        done = end
    return windows


@torch.no_grad()
def _document_nll(model, ids: list[int], prefix: int, max_len: int) -> tuple[float, int]:
    """(−log p summed over the document's tokens, tokens) for one document on its own."""
    seq = torch.tensor([prefix] + ids)
    nll = 0.0
    for start, stop, scored in document_windows(len(ids), max_len):
        logits = model(input_ids=seq[None, start:stop]).logits[0, -scored:].float()
        targets = seq[stop + 1 - scored : stop + 1]
        nll -= torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).double().sum().item()
    return nll, len(ids)


def _per_document_rows(model, tokenizer, prefix: int, docs: dict[str, list[str]], seq_len: int) -> list[dict]:
    r"""Perplexity per token, word and byte with each document scored alone (lm-evaluation-
    harness's ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``: words are the pieces
    ``re.split(r"\s+")`` gives, bytes the UTF-8 length)."""
    import re

    totals: dict[str, np.ndarray] = {}
    for name, texts in docs.items():
        t = np.zeros(5)  # nll, tokens, words, bytes, documents
        for text in texts:
            nll, n = _document_nll(model, tokenizer.encode(text), prefix, seq_len)
            t += (nll, n, len(re.split(r"\s+", text)), len(text.encode("utf-8")), 1)
        totals[name] = t
    if len(totals) > 1:
        totals["all"] = sum(totals.values())
    rows = []
    for name, (nll, n, words, nbytes, ndocs) in totals.items():
        rows.append({"step": None, "split": "file", "mode": "document", "source": name, "language": name,
                     "loss": nll / n, "ppl": math.exp(min(nll / n, 50.0)), "tokens": int(n),
                     "documents": int(ndocs), "words": int(words), "bytes": int(nbytes),
                     "word_perplexity": math.exp(min(nll / words, 700.0)),
                     "byte_perplexity": math.exp(nll / nbytes), "bits_per_byte": nll / nbytes / math.log(2),
                     "seq_len": seq_len})
    return rows


def load_model_dir(model_dir: str | Path):
    """(model dir, model in fp32 eval mode, norallm Tokenizer) of an exported model."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise NorallmError(f"{model_dir} is not an exported model dir (no config.json); run `norallm export` first.")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model_dir, model, Tokenizer(model_dir)


def eval_model_dir(model_dir: str | Path, data: list[str], seq_len: int | None, max_samples: int | None,
                   batch_size: int, text_field: str = "text", per_document: bool = False) -> list[dict]:
    """Perplexity of an exported model on JSONL files, one row per ``[NAME=]PATH``: the whole file
    by default (``max_samples`` windows otherwise), at the model's training length unless
    ``seq_len`` says otherwise; each row says how much of the file it scored. ``per_document``:
    each document scored alone after the document prefix (as lm-evaluation-harness scores
    perplexity tasks), with word and byte perplexity; ``max_samples`` then counts documents."""
    import glob
    import json

    from data_pipeline.sources import BadRecords
    from data_pipeline.units import iter_documents

    model_dir, model, tokenizer = load_model_dir(model_dir)
    limit = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    seq_len = seq_len or default_seq_len(model_dir)
    if limit and seq_len > limit:
        raise NorallmError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}; lower it.")
    sets, sizes, docs = [], {}, {}
    for item in data:
        name, _, path = item.rpartition("=")
        name = name or Path(path).name.split(".")[0]
        if not glob.glob(path):
            raise NorallmError(f"--data {item}: no file matches {path}.")
        bad = BadRecords()
        # Built unchecked: the name is a row label here, never a shard directory, so any will do.
        source = SourceConfig.model_construct(name=name, paths=[path], text_field=text_field)
        if per_document:
            texts = [d.text for d in iter_documents(source, bad)]
            docs[name] = texts[:max_samples] if max_samples is not None else texts
            continue
        tokens: list[int] = []
        for doc in iter_documents(source, bad):
            tokens += tokenizer.encode(doc.text) + [tokenizer.eos_id]
            if max_samples is not None and len(tokens) > (max_samples + 1) * seq_len:
                break
        stream = _ArrayStream(np.asarray(tokens, dtype=np.int64))
        rows = eval_samples(stream, seq_len, max_samples if max_samples is not None else len(tokens), 0, 1)
        if not len(rows):
            raise NorallmError(f"--data {item}: fewer than seq_len + 1 = {seq_len + 1} tokens; lower --seq-len.")
        sets.append((name, name, rows))
        sizes[name] = len(tokens)
    if per_document:
        return _per_document_rows(model, tokenizer, document_prefix_id(model_dir, tokenizer), docs, seq_len)
    out = []
    for row in evaluate(model, sets, batch_size, step=-1):
        read = sizes.get(row["source"], sum(sizes.values()))
        row = {**row, "split": "file", "step": None, "seq_len": seq_len, "tokens_read": read,
               "coverage": round(row["tokens"] / read, 4) if read else None}
        out.append(row)
    return out


class _ArrayStream:
    """In-memory tokens with the part of TokenStream's interface eval_samples uses."""

    def __init__(self, tokens: np.ndarray):
        self._tokens = tokens
        self.total_tokens = len(tokens)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        return self._tokens[start:stop]
