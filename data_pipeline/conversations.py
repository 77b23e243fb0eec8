"""Conversation sources for supervised fine-tuning: the JSONL files of ``data.sources`` read as the
pretraining sources are (data_pipeline.sources: plain, .gz or .zst; a line longer than
``data.max_document_bytes`` skipped unread; every unusable record counted with its file:line; a
source whose bad records exceed ``data.max_bad_fraction`` fails), each record checked as a
conversation. Tokenizing, the length policy and packing are the training side's
(training.data.chat, training.data.sft).

Records: ``{"messages": [{"role": ..., "content": ...}, ...]}`` or Alpaca-style
``{"instruction", "input", "output"}`` (converted to a user turn and an assistant turn). A
conversation is a list of turns, not one text, so ``text_field`` does not apply: ``messages`` is
the field chat datasets and transformers' ``apply_chat_template`` use. Only ``format: jsonl``.

Policy for bad conversations (each class counted and reported, never silent):

- unknown role, empty content, no assistant turn, non-alternating turns (after an optional
  leading system message, user and assistant must alternate, starting with user): **skipped**;
- a trailing user turn with no answer: **dropped** from the conversation (counted as truncated).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import (
    MAX_LINE_BYTES,
    BadRecords,
    check_bad_records,
    iter_jsonl_records,
    resolve_files,
)

ROLES = ("system", "user", "assistant")
# Reasons counted for conversations that are kept, shortened: the trailing user turn (check, here)
# and the exchanges past the context (training.data.chat.fit). They are no bad records.
SHORTENED = ("truncated_trailing_user_turn", "truncated_too_long")


def source_problem(fmt: str | None, text_field: str | None) -> str | None:
    """Why a source with this ``format`` and ``text_field`` (None: not given) cannot hold
    conversations, or None when it can."""
    if fmt not in (None, "jsonl"):
        return (f"format '{fmt}': conversations are read from JSONL files (plain, .gz or .zst); "
                "set format: jsonl or remove it.")
    if text_field not in (None, SourceConfig.model_fields["text_field"].default):
        return (f"text_field '{text_field}': a conversation is read from 'messages' (or instruction/input/"
                "output), not from one text field; remove text_field.")
    return None


def iter_conversations(spec: SourceConfig, bad: BadRecords,
                       max_record_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[list[dict], str]]:
    """(messages, 'file:line') for each usable conversation of the source's files, in file order,
    after the policy above; every other record counted in ``bad``."""
    problem = source_problem(spec.format, spec.text_field)
    if problem is not None:
        raise DataError(f"source '{spec.name}': {problem}")
    for path in resolve_files(spec):
        for record, where in iter_jsonl_records(spec, path, bad, max_record_bytes):
            messages = to_messages(record)
            if messages is None:
                bad.add("not_a_conversation", where, "neither messages nor instruction/output")
                continue
            messages = check(messages, where, bad)
            if messages is not None:
                yield messages, where


def to_messages(record: dict) -> list[dict] | None:
    """A record's conversation (Alpaca converted); None when it has neither form."""
    if isinstance(record.get("messages"), list):
        return record["messages"]
    if "instruction" in record and "output" in record:
        prompt = str(record.get("instruction", ""))
        if record.get("input"):
            prompt += "\n\n" + str(record["input"])
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    return None


def check(messages: list, where: str, bad: BadRecords) -> list[dict] | None:
    """Apply the policy above; returns the usable messages or None (counted)."""
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            bad.add("unknown_role", where, repr(m.get("role") if isinstance(m, dict) else m)[:40])
            return None
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            bad.add("empty_content", where, m["role"])
            return None
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            bad.add("non_alternating", where, f"turn {i} is {m['role']}")
            return None
    if not any(m["role"] == "assistant" for m in turns):
        bad.add("no_assistant_turn", where)
        return None
    if turns[-1]["role"] == "user":
        bad.add("truncated_trailing_user_turn", where)
        messages = messages[:-1]
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def skipped_records(bad: BadRecords) -> BadRecords:
    """The records of ``bad`` that were skipped, without the conversations kept but shortened."""
    return BadRecords(bad.max_examples, bad.records_seen,
                      Counter({r: n for r, n in bad.counts.items() if r not in SHORTENED}),
                      {r: e for r, e in bad.examples.items() if r not in SHORTENED})


def check_source(source: str, bad: BadRecords, max_bad_fraction: float, allow_truncated_files: bool) -> None:
    """Raise DataError, as prepare does for a pretraining source, when the source's skipped records
    (the shortened conversations were kept) exceed ``max_bad_fraction`` or a file of it is cut."""
    check_bad_records(source, skipped_records(bad), max_bad_fraction, allow_truncated_files)
