"""NorMistral-7b-warm-instruct's chat format: the template, token-level loss masks, the length
policy and packing.

Per message ``<|im_start|> {role}\\n{content}<|im_end|>\\n`` (a space after ``<|im_start|>``),
the conversation opened by ``<s>``; the generation prompt is ``<|im_start|> assistant\\n``; eos is
``<|im_end|>``, pad ``</s>``. Loss is taken on assistant content and its ``<|im_end|>`` only.

The conversations come checked from data_pipeline.conversations (record forms, roles, turn
order). Longer than the context, a conversation is **truncated** to its longest prefix of whole
user/assistant exchanges that fits, and **skipped** when not even the first exchange fits (each
counted and reported, never silent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipeline.sources import BadRecords

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
BOS, PAD = "<s>", "</s>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|im_start|> ' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|> assistant\\n' }}{%- endif %}"
)


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template as text (what ``apply_chat_template(..., tokenize=False)`` gives)."""
    text = BOS + "".join(f"{IM_START} {m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START} assistant\n" if add_generation_prompt else "")


@dataclass(frozen=True)
class ChatIds:
    bos: int
    im_start: int
    im_end: int
    pad: int


def encode(messages: list[dict], tokenizer, ids: ChatIds) -> tuple[list[int], list[int], list[int]]:
    """Token ids, loss mask (1 = predicted and trained) and the token index where each message
    ends, segment by segment so that the mask is exact. The segments split where the byte-level
    pre-tokenizer splits anyway (special tokens, the newline), so the ids equal those of the
    rendered text (a test checks this against ``apply_chat_template``)."""
    tokens, mask, ends = [ids.bos], [0], []
    for m in messages:
        header = [ids.im_start] + tokenizer.encode(f" {m['role']}\n")
        body = tokenizer.encode(m["content"]) + [ids.im_end]
        trained = 1 if m["role"] == "assistant" else 0
        tokens += header + body
        mask += [0] * len(header) + [trained] * len(body)
        nl = tokenizer.encode("\n")
        tokens += nl
        mask += [0] * len(nl)
        ends.append(len(tokens))
    return tokens, mask, ends


def fit(messages: list[dict], tokens: list[int], mask: list[int], ends: list[int], max_tokens: int,
        where: str, bad: BadRecords) -> tuple[list[int], list[int]] | None:
    """Truncate to whole exchanges that fit in ``max_tokens`` (the policy above)."""
    if len(tokens) <= max_tokens:
        return tokens, mask
    for k in range(len(messages), 0, -1):
        if messages[k - 1]["role"] == "assistant" and ends[k - 1] <= max_tokens:
            bad.add("truncated_too_long", where, f"{len(tokens)} tokens, kept {ends[k - 1]}")
            return tokens[: ends[k - 1]], mask[: ends[k - 1]]
    bad.add("too_long", where, f"{len(tokens)} tokens; the first exchange alone exceeds {max_tokens}")
    return None


def pack(convs: list[tuple[list[int], list[int]]], window: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """Greedy packing, in order, of whole conversations into rows of ``window`` tokens.

    Returns (tokens, loss_mask, doc_ids), each (rows, window). Conversations are numbered within
    their row; padding has mask 0 and the number after the row's last conversation, so with
    block-diagonal attention no conversation sees another or the padding."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = window + 1
    for conv in convs:
        if used + len(conv[0]) > window:
            rows.append([])
            used = 0
        rows[-1].append(conv)
        used += len(conv[0])
    tokens = np.full((len(rows), window), pad_id, dtype=np.int64)
    loss_mask = np.zeros((len(rows), window), dtype=np.int8)
    doc_ids = np.zeros((len(rows), window), dtype=np.int64)
    for r, row in enumerate(rows):
        pos = 0
        for d, (toks, msk) in enumerate(row):
            tokens[r, pos : pos + len(toks)] = toks
            loss_mask[r, pos : pos + len(toks)] = msk
            doc_ids[r, pos : pos + len(toks)] = d
            pos += len(toks)
        doc_ids[r, pos:] = len(row)
    return tokens, loss_mask, doc_ids
