"""Checks across config sections, over the raw per-section dicts that passed their type checks (so
a typo in one field does not hide an inconsistency between two others): batch arithmetic, the
mixture, document masks per architecture, model overrides against the transformers config class,
a warm start against its base. Checks within one section are that section's ``field_problems``
(training.config). training.config runs both and reports every problem at once."""

from __future__ import annotations

import difflib
from pathlib import Path

from data_pipeline.conversations import source_problem as conversation_source_problem
from norallm.errors import NorallmError
from norallm.files import file_hash
from training.model.families import FLAVORS, base_json, family, flavor_from_json, is_bloom, shape_from_dict


def number(section: dict, key: str) -> int | float | None:
    v = section.get(key)
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def _data_problems(model: dict, data: dict, tok: dict) -> list[tuple[str, str]]:
    """The mixture (shares and weights), document boundaries and tokenizer kind, checked together."""
    problems: list[tuple[str, str]] = []
    listed = [s for s in data.get("sources") or [] if isinstance(s, dict)] if isinstance(data.get("sources"), list) else []
    for i, s in enumerate(listed):
        if s.get("valid_fraction") == 1.0 and any(s.get(k) is not None for k in ("share", "weight", "max_epochs")):
            problems.append((f"data.sources.{i}", "valid_fraction: 1 makes it validation-only, never trained on: "
                             "remove its share, weight and max_epochs."))
    if listed and all(s.get("valid_fraction") == 1.0 for s in listed):
        problems.append(("data.sources", "every source is validation-only (valid_fraction: 1): nothing to train on."))
    sources = [s for s in listed if s.get("valid_fraction") != 1.0]  # the mixture
    shares = [s.get("share") for s in sources]
    for i, s in enumerate(sources):
        if s.get("share") is not None and s.get("weight") is not None:
            problems.append((f"data.sources.{i}", "give either share (a fixed fraction of the budget) or weight "
                             "(relative to the other sources), not both."))
    total = sum(x for x in shares if isinstance(x, int | float))
    rest = [s for s in sources if s.get("share") is None]
    if total > 1 + 1e-9:
        problems.append(("data.sources", f"the shares add up to {total:g} > 1; lower them."))
    elif rest and total >= 1 - 1e-9:
        problems.append(("data.sources", f"the shares add up to 1, leaving nothing for {rest[0].get('name')!r}; "
                         "lower the shares or remove the sources without one."))
    elif sources and not rest and abs(total - 1) > 1e-9:
        problems.append(("data.sources", f"the shares add up to {total:g}, not 1, and no source is left to take "
                         "the rest; make them add up to 1 or drop one source's share."))
    weighted = [s.get("weight") is not None for s in rest]
    if any(weighted) and not all(weighted):
        problems.append(("data.sources", "some sources without a share have a weight and some do not; give "
                         "every one a weight, or none (then they are weighted by their unique tokens)."))
    flavor = model.get("flavor")
    attn = model.get("attn_implementation")
    bloom = is_bloom(flavor)
    if data.get("document_boundaries") is True and bloom and attn == "eager":
        problems.append(("data.document_boundaries", f"'{flavor}' is BLOOM, and its eager attention "
                         "(transformers' own) ignores position ids, so documents would attend to each other; "
                         "set model.attn_implementation to auto (norallm's fused ALiBi attention masks them)."))
    if bloom and attn == "flash_attention_2":
        problems.append(("model.attn_implementation", f"'{flavor}' is BLOOM: its ALiBi attention runs as auto, "
                         "sdpa, flex_attention (training.model.alibi) or eager, not flash_attention_2."))
    overrides = model.get("overrides") if isinstance(model.get("overrides"), dict) else {}
    dropout = overrides.get("attention_dropout")
    if bloom and attn == "flex_attention" and dropout:
        problems.append(("model.attn_implementation", f"flex_attention has no attention dropout, and "
                         f"model.overrides.attention_dropout is {dropout}; use auto or sdpa."))
    if tok.get("train") is True and tok.get("kind") == "sentencepiece":
        problems.append(("tokenizer.kind", "tokenizer.train trains a byte-level BPE (an HF tokenizer); set kind "
                         "to auto or hf, or train: false to use the SentencePiece model as it is."))
    return problems


def _override_problems(flavor: str, overrides: dict) -> list[tuple[str, str]]:
    """``model.overrides`` against the family's config fields (training.model.families, no
    transformers): unknown keys (transformers would accept and ignore them) and shapes the model
    cannot be built with."""
    fam = FLAVORS[flavor].family
    known = fam.known_fields()
    problems = []
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append((f"model.overrides.{key}", f"not a {fam.config_class} field, so transformers would "
                             f"ignore it.{hint}"))
    shape = {**FLAVORS[flavor].config, **{k: v for k, v in overrides.items() if k in known}}
    shape = {fam.aliases.get(k, k): v for k, v in shape.items()}
    hidden = shape.get("hidden_size")
    heads = shape.get(fam.heads_key)
    kv = shape.get("num_key_value_heads")
    if all(isinstance(x, int) and x > 0 for x in (hidden, heads)):
        if fam.head_dim == "fixed" or (fam.head_dim == "derived" and shape.get("head_dim") is None):
            if hidden % heads:
                problems.append(("model.overrides", f"hidden_size {hidden} is not divisible by {fam.heads_key} "
                                 f"{heads}; choose a multiple of it" +
                                 (" (or set head_dim)." if fam.head_dim == "derived" else ".")))
            elif fam.position == "rope" and (hidden // heads) % 2:
                problems.append(("model.overrides", f"head size {hidden} / {heads} = {hidden // heads} is odd; "
                                 "RoPE needs an even head size."))
        if fam.gqa and isinstance(kv, int) and kv > 0 and heads % kv:
            problems.append(("model.overrides.num_key_value_heads", f"{kv} does not divide num_attention_heads "
                             f"{heads}; grouped-query attention needs a divisor of it."))
    return problems


def batch_problems(global_batch: int, micro_batch: int, world_size: int | None,
                   grad_accum: int | None = None) -> list[tuple[str, str]]:
    """The global batch splits into whole micro-batches on every rank: checked by `validate` (with
    train.world_size, when set) and again at launch (with the ranks started)."""
    if world_size:
        per_step = micro_batch * world_size
        if global_batch % per_step:
            return [("train.global_batch_size", f"{global_batch} is not divisible by micro_batch_size × world_size = "
                     f"{micro_batch} × {world_size}; make it a multiple of {per_step}.")]
        if grad_accum is not None and grad_accum * per_step != global_batch:
            return [("train.grad_accum_steps", f"{grad_accum} × {per_step} ≠ global_batch_size {global_batch}; set "
                     f"it to {global_batch // per_step} or omit it.")]
    elif global_batch % micro_batch:
        return [("train.global_batch_size", f"{global_batch} is not a multiple of micro_batch_size {micro_batch}.")]
    return []


def _base_dir(model: dict) -> Path | None:
    """A warm start's local base dir with a config.json (None: not a warm start, or not readable here)."""
    from norallm.files import expand_path

    base = model.get("base")
    if model.get("init") != "warm" or not isinstance(base, str):
        return None
    path = Path(expand_path(base))
    return path if (path / "config.json").is_file() else None


def resolve_warm_start(raw: dict) -> list[tuple[str, str]]:
    """A warm start without ``model.flavor`` takes the base's shape from its config.json: the flavor
    of its family with the shape as overrides (the user's own overrides win), written into the
    resolved config so that export and resume never need the base again."""
    model = raw.get("model")
    if not isinstance(model, dict) or model.get("init") != "warm" or "flavor" in model:
        return []
    base = _base_dir(model)
    if base is None:
        return [("model.flavor", "not given, and a warm start takes it from model.base/config.json, which is not "
                 "there; fix model.base or set model.flavor.")]
    try:
        flavor, shape = flavor_from_json(base)
    except NorallmError as e:
        return [("model.base", str(e))]
    user = model.get("overrides") if isinstance(model.get("overrides"), dict) else {}
    model["flavor"], model["overrides"] = flavor, {**shape, **user}
    return []


def _base_tokenizer_dir(model: dict) -> Path | None:
    """The base's tokenizer dir (model.base_tokenizer, else model.base) when it holds a tokenizer."""
    from norallm.files import expand_path

    where = model.get("base_tokenizer") or model.get("base")
    if not isinstance(where, str):
        return None
    path = Path(expand_path(where))
    return path if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file() else None


def resolve_tokenizer_strategy(raw: dict) -> list[tuple[str, str]]:
    """``model.tokenizer_strategy`` written into the tokenizer section, where data preparation and
    training read it: ``keep`` points tokenizer.path at the base's tokenizer and takes its size (and
    the base's embedding rows as model.vocab_size); ``extend`` has tokenizer.train extend the base's
    tokenizer by model.extend_tokens. A base that is not readable here is left to the launch."""
    from data_pipeline.errors import DataError
    from data_pipeline.tokenizer import Tokenizer
    from norallm.files import expand_path

    model, tok = raw.get("model"), raw.get("tokenizer")
    if not isinstance(model, dict) or model.get("init") != "warm":
        return []
    strategy = model.get("tokenizer_strategy", "replace")
    if strategy not in ("keep", "extend"):
        return []
    if tok is None:
        tok = raw["tokenizer"] = {}
    if not isinstance(tok, dict):
        return []
    base_tok = _base_tokenizer_dir(model)
    if base_tok is None:
        return [("model.tokenizer_strategy", f"{strategy} starts from the base's tokenizer, and model.base(_tokenizer) "
                 "holds no tokenizer.json or tokenizer.model; point model.base_tokenizer at it.")]
    try:
        base_size = Tokenizer(base_tok).vocab_size
    except DataError as e:
        return [("model.base_tokenizer", str(e))]
    if strategy == "extend":
        if tok.get("train") is not True:
            return [("tokenizer.train", "model.tokenizer_strategy: extend writes the extended tokenizer to "
                     "tokenizer.path: set train: true.")]
        n = model.get("extend_tokens")
        tok.update(extend_from=str(base_tok), extend_tokens=n)
        if isinstance(n, int):
            tok.setdefault("vocab_size", base_size + n)
        return []
    if tok.get("train") is True:
        return [("tokenizer.train", "model.tokenizer_strategy: keep trains on the base's own tokenizer; remove "
                 "train: true.")]
    path = tok.setdefault("path", str(base_tok))
    mine = Path(expand_path(path)) if isinstance(path, str) else None
    if mine is not None and mine.resolve() != base_tok.resolve():
        name = "tokenizer.json" if (base_tok / "tokenizer.json").is_file() else "tokenizer.model"
        if not (mine / name).is_file() or file_hash(mine / name) != file_hash(base_tok / name):
            return [("tokenizer.path", f"model.tokenizer_strategy: keep trains on the base's own tokenizer, and {path} "
                     f"is another ({name} differs from {base_tok}'s); leave tokenizer.path out, or choose replace.")]
    tok.setdefault("vocab_size", base_size)
    base = _base_dir(model)
    if base is not None and "vocab_size" not in model:
        rows = base_json(base).get("vocab_size")
        if isinstance(rows, int):
            model["vocab_size"] = rows  # the base's embedding rows (Qwen's are padded past its tokenizer)
    return []


def _base_shape_problems(model: dict) -> list[tuple[str, str]]:
    """A warm start builds the base's own modules, but export and resume build flavor + overrides:
    the two must be one shape, every field of it (an rms eps or rope theta off is silent). Both
    are read as plain dicts (training.model.families), so validating needs no torch."""
    base, flavor = _base_dir(model), model.get("flavor")
    if base is None or flavor not in FLAVORS:
        return []
    overrides = model.get("overrides") if isinstance(model.get("overrides"), dict) else {}
    try:
        base_cfg = base_json(base)
        theirs_family = family(base_cfg.get("model_type"), f"model.base '{base}'")
    except NorallmError as e:
        return [("model.base", str(e))]
    fam = FLAVORS[flavor].family
    if fam is not theirs_family:
        return [("model.flavor", f"{flavor} is a {fam.model_type} flavor but model.base is a "
                 f"{theirs_family.model_type} model; leave model.flavor out to take the base's.")]
    ours = shape_from_dict(fam, FLAVORS[flavor].merged(overrides))
    theirs = shape_from_dict(fam, base_cfg)
    return [(f"model.overrides.{key}", f"the base has {key}={theirs[key]!r}, {flavor} with these overrides gives "
             f"{ours[key]!r}; set it to {theirs[key]!r}, or leave model.flavor out to take the base's shape.")
            for key in ours if ours[key] != theirs[key]]


def _attention_problems(model: dict) -> list[tuple[str, str]]:
    """``model.attn_implementation`` against what the flavor's family trains with."""
    flavor, attn = model.get("flavor"), model.get("attn_implementation")
    if flavor not in FLAVORS or attn in (None, "auto"):
        return []
    fam = FLAVORS[flavor].family
    if fam.position == "alibi" or attn in fam.attention:  # BLOOM's own rules are in _data_problems
        return []
    return [("model.attn_implementation", f"'{flavor}' is {fam.model_type}, which trains with "
             f"{', '.join(fam.attention)} (or auto), not {attn}.")]


# Families whose attention takes norallm's hybrid mask (a 4D mask or a BlockMask) as it is: rotary
# positions, no alternating local layers, no soft-capped scores.
HYBRID_FAMILIES = ("mistral", "llama", "qwen2", "qwen3", "olmo2")


def _hybrid_problems(model: dict, train: dict, data: dict, sft: bool) -> list[tuple[str, str]]:
    """``train.objective: hybrid`` against the mode, the data and the model's attention."""
    if train.get("objective") != "hybrid":
        return []
    problems = []
    if sft:
        problems.append(("train.objective", "hybrid is a pretraining objective; an sft config trains causal only."))
    if data.get("document_boundaries") is not True:
        problems.append(("data.document_boundaries", "train.objective: hybrid attends both ways inside each "
                         "document, so it needs the documents' boundaries; set it to true."))
    flavor, attn = model.get("flavor"), model.get("attn_implementation")
    if flavor in FLAVORS:
        fam = FLAVORS[flavor].family
        if fam.model_type not in HYBRID_FAMILIES:
            problems.append(("train.objective", f"'{flavor}' is {fam.model_type}; hybrid runs on "
                             f"{', '.join(HYBRID_FAMILIES)} (their attention takes the hybrid mask as it is)."))
        else:
            overrides = model.get("overrides") if isinstance(model.get("overrides"), dict) else {}
            merged = FLAVORS[flavor].merged(overrides)
            window, seq_len = merged.get("sliding_window"), number(data, "seq_len")
            binds = window and seq_len and window < seq_len and merged.get("use_sliding_window", True)
            if binds:
                problems.append(("train.objective", f"'{flavor}' has a sliding window of {window} < data.seq_len "
                                 f"{seq_len}, which the hybrid mask does not apply; raise the window to seq_len "
                                 "(model.overrides.sliding_window) or use objective: causal."))
    if attn == "flash_attention_2":
        problems.append(("model.attn_implementation", "flash_attention_2 cannot mix causal and bidirectional "
                         "rows in one batch; use auto (flex_attention on a GPU), sdpa or eager with hybrid."))
    return problems


def consistency(cfg: dict[str, dict]) -> list[tuple[str, str]]:
    """Checks between fields. ``cfg`` holds, per section, the fields that passed type checks, so a
    typo in one field does not hide an inconsistency between two others."""
    problems: list[tuple[str, str]] = []
    model, train, data, tok = (cfg.get(k, {}) for k in ("model", "train", "data", "tokenizer"))
    flavor = model.get("flavor")
    if isinstance(flavor, str) and flavor not in FLAVORS:
        problems.append(("model.flavor", f"unknown flavor '{flavor}'; use one of {sorted(FLAVORS)}."))
    problems += _base_shape_problems(model)
    problems += _attention_problems(model)
    gbs, mbs = number(train, "global_batch_size"), number(train, "micro_batch_size")
    if gbs and mbs:
        problems += batch_problems(gbs, mbs, number(train, "world_size"), number(train, "grad_accum_steps"))
    sources = data.get("sources")
    if isinstance(sources, list):
        names = [s.get("name") for s in sources if isinstance(s, dict)]
        for dup in sorted({n for n in names if isinstance(n, str) and names.count(n) > 1}):
            problems.append(("data.sources", f"source name '{dup}' is used twice; names must be unique."))
    problems.extend(_data_problems(model, data, tok))
    problems.extend(_hybrid_problems(model, train, data, cfg.get("sft") is not None))
    if isinstance(flavor, str) and flavor in FLAVORS and isinstance(model.get("overrides"), dict) \
            and model["overrides"]:  # a flavor's own shape is known to build
        problems.extend(_override_problems(flavor, model["overrides"]))
    if cfg.get("sft") is not None and is_bloom(flavor) and model.get("attn_implementation") == "eager":
        problems.append(("sft", f"'{flavor}' is BLOOM, and its eager attention (transformers' own) ignores "
                         "position ids, so packed conversations would attend to each other; set "
                         "model.attn_implementation to auto (norallm's fused ALiBi attention masks them)."))
    if cfg.get("sft") is not None and isinstance(sources, list):
        for i, src in enumerate(sources):
            if isinstance(src, dict) and (problem := conversation_source_problem(src.get("format"),
                                                                                  src.get("text_field"))):
                problems.append((f"data.sources.{i}", problem))
    seq_len = number(data, "seq_len")
    if seq_len and flavor in FLAVORS:
        overrides = model.get("overrides") if isinstance(model.get("overrides"), dict) else {}
        max_pos = FLAVORS[flavor].max_positions(overrides)
        if max_pos is not None and seq_len > max_pos:
            problems.append(("data.seq_len", f"{seq_len} exceeds the model's {max_pos} positions; lower it or "
                             "raise model.overrides.max_position_embeddings."))
    model_vocab, tok_vocab = number(model, "vocab_size"), number(tok, "vocab_size")
    if model_vocab and tok_vocab and model_vocab < tok_vocab:
        problems.append(("model.vocab_size", f"{model_vocab} < tokenizer.vocab_size {tok_vocab}."))
    if train.get("precision", "bf16") == "bf16" and cfg.get("zero", {}).get("stage") == 0:  # bf16: the default
        # DeepSpeed 0.19 has no fp32 master weights without ZeRO: bf16 with fp32 gradient
        # accumulation raises NotImplementedError inside deepspeed.initialize.
        problems.append(("zero.stage", "0 with train.precision bf16: DeepSpeed keeps no fp32 master weights "
                         "without ZeRO; use zero.stage 1 (the same per-rank weights and gradients, the optimizer "
                         "state sharded) or train.precision fp32."))
    return problems
