"""The data sections of a config, typed here, next to what they configure: ``tokenizer``
(data_pipeline.tokenizer) and ``data`` with its ``sources`` (sources, prepare, plan, mixture).
training.config composes them into the root config and reports their problems with the rest.

Relative paths are relative to the working directory; ``$VARS`` and ``~`` expand.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator

from data_pipeline.tokenizer import Tokenizer, TokenizerKind
from norallm.files import expand_path
from norallm.section import Section


class TokenizerConfig(Section):
    path: str = Field(description="HF tokenizer dir (tokenizer.json), or a SentencePiece .model or a dir "
                      "holding tokenizer.model (e.g. Mistral's); a BPE is trained there when train: true")
    kind: TokenizerKind = Field(
        "auto", description="auto: SentencePiece when path is a model file or a dir with tokenizer.model and "
        "no tokenizer.json, else HF")
    train: bool = False
    vocab_size: int = Field(32768, ge=260)
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    pad_token: str = "<pad>"
    train_documents: int = Field(200_000, ge=1, description="documents sampled to train the BPE")
    min_frequency: int = Field(2, ge=1)
    extra_special_tokens: list[str] = Field(default_factory=list, description="special tokens after pad/bos/eos "
                                            "in a trained BPE (e.g. <mask> for train.objective: hybrid)")
    normalizer: Literal["none", "nfkc"] = Field("none", description="a trained BPE's text normalization")
    split_digits: bool = Field(False, description="a trained BPE gives each digit a piece of its own")
    max_token_length: int | None = Field(None, ge=1, description="a trained BPE's longest piece, in characters")
    extend_from: str | None = Field(None, description="set by model.tokenizer_strategy: extend (the base's "
                                    "tokenizer dir): train: true then extends it instead of training a new BPE")
    extend_tokens: int | None = Field(None, ge=1, description="set by model.tokenizer_strategy: extend")

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_path(v)

    def load(self) -> Tokenizer:
        """The configured tokenizer, honouring ``kind`` (the one way every command loads it: with
        both tokenizer.json and tokenizer.model in a dir, auto and an explicit kind differ)."""
        return Tokenizer(self.path, kind=self.kind)


# The source formats, once: the config's type and the readers' dispatch (data_pipeline.units).
SourceFormat = Literal["jsonl", "files", "parquet", "hf"]
FORMATS: tuple[str, ...] = get_args(SourceFormat)


class SourceConfig(Section):
    """One source, as the whole pipeline sees it: read (sources, columnar), cut into units,
    tokenized into shards (prepare), weighed in the plan and the mixture."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    paths: list[str] = Field(min_length=1, description="files or globs (jsonl, files, parquet); dataset dirs "
                             "or hub ids (hf)")
    format: SourceFormat = Field(
        "jsonl", description="jsonl (plain/.gz/.zst), files (one file = one document), parquet, hf (datasets)")
    text_field: str = Field("text", description="JSON key, Parquet column or dataset column holding the text")
    language: str = Field("", description="nob, nno, code, ...: groups validation losses by language")
    share: float | None = Field(None, gt=0, le=1, description="fixed fraction of the training tokens (code: 0.2)")
    weight: float | None = Field(None, gt=0, description="relative weight among the sources without a share; "
                                 "default: their unique tokens, so each of them repeats equally often")
    max_epochs: float | None = Field(None, gt=0, description="plan and train refuse a budget that repeats the "
                                     "source more often than this")
    unique_tokens: int | None = Field(None, ge=1, description="declared train tokens, for `norallm plan` "
                                      "before the source is prepared (the manifest wins once it exists)")
    valid_fraction: float | None = Field(None, ge=0.0, le=1.0, description="hold-out; default data.valid_fraction; "
                                         "1: a validation-only source (a separate dev file), never trained on")
    hf_split: str = Field("train", description="format hf: the split to read")
    hf_subset: str | None = Field(None, description="format hf: the dataset's config (subset) name")

    def valid_fraction_or(self, default: float) -> float:
        """This source's hold-out: its own valid_fraction, else ``default`` (data.valid_fraction)."""
        return default if self.valid_fraction is None else self.valid_fraction

    @property
    def validation_only(self) -> bool:
        """Every document held out: the source is evaluated on, never trained on or planned for."""
        return self.valid_fraction == 1.0


class DecontaminationConfig(Section):
    """Training documents that share a long n-gram with evaluation data (data_pipeline.contamination)."""

    ngram_words: int = Field(13, ge=3, description="n-gram length in normalised words (13: GPT-3, OLMo)")
    action: Literal["drop", "count"] = Field("drop", description="drop: remove such documents before "
                                             "tokenizing; count: keep them and only report them")
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks or selections (noreval-mc, "
                             "noreval-gen) whose test and validation documents are checked against")
    include_path: str | None = Field(None, description="a dir of your own lm-eval task YAMLs for tasks")
    files: list[str] = Field(default_factory=list, description="more evaluation text: JSONL (text_field), "
                             "or plain text files (each file one passage); globs")
    text_field: str = Field("text", description="the JSON key holding the text in files")
    dev_sources: bool = Field(True, description="also check against the validation-only sources "
                              "(valid_fraction: 1): the run's own held-out dev files")

    @field_validator("include_path")
    @classmethod
    def _expand_dir(cls, v: str | None) -> str | None:
        return None if v is None else expand_path(v)


class DedupConfig(Section):
    """Duplicates within and across the training sources, removed before tokenizing
    (data_pipeline.dedup). Defaults are FineWeb's (datatrove's MinhashConfig): 5-word shingles,
    14 bands of 8 MinHash values, LSH threshold about (1/14)^(1/8) ≈ 0.72 Jaccard."""

    exact: bool = Field(True, description="drop documents whose normalised text equals an earlier one's")
    near: bool = Field(True, description="drop documents that MinHash LSH finds near an earlier one")
    shingle_words: int = Field(5, ge=1, description="words per MinHash shingle")
    bands: int = Field(14, ge=1, le=64, description="LSH bands: a pair sharing one band is a duplicate")
    rows_per_band: int = Field(8, ge=1, le=64, description="MinHash values per band (permutations = bands × rows)")
    seed: int = Field(1, ge=0, description="MinHash seed: a change recomputes every signature")
    dir: str | None = Field(None, description="signatures and drop lists; default <shards_dir>/dedup")
    decontamination: DecontaminationConfig | None = None

    @field_validator("dir")
    @classmethod
    def _expand_dir(cls, v: str | None) -> str | None:
        return None if v is None else expand_path(v)


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    shards_dir: str
    seq_len: int = Field(ge=8)
    valid_fraction: float = Field(0.01, ge=0.0, le=0.5)
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    allow_truncated_files: bool = Field(False, description="keep what a cut .gz/.zst file held instead of "
                                        "failing the source (how much was lost is unknown)")
    shard_tokens: int = Field(2**28, ge=1024)
    shuffle: bool = True
    prepare_unit_bytes: int = Field(2**29, ge=1024, description="input bytes per prepare work unit: the grain "
                                    "of parallelism, array-task splits and restarts")
    max_document_bytes: int = Field(2**28, ge=1024, description="longer documents are skipped and counted "
                                    "(document_too_long) without being read whole")
    document_boundaries: bool = Field(False, description="reset position ids and attend only within each "
                                      "document of a packed sample (Mistral flavors; BLOOM's ALiBi cannot)")
    allow_mixture_change: bool = Field(False, description="on resume, accept changed shares or sources: the new "
                                       "mixture applies from the samples consumed so far, nothing repeated or skipped")
    gpu_throughput_tokens_per_s: float | None = Field(None, gt=0, description="training tokens per second per "
                                                      "GPU, for the GPU-hour estimate of `norallm plan`")
    dedup: DedupConfig | None = Field(None, description="remove duplicates (and evaluation text) before "
                                      "tokenizing: `norallm dedup`, used by prepare")

    @field_validator("shards_dir")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_path(v)

    @field_validator("dedup")
    @classmethod
    def _dedup_dir_is_no_source(cls, v: DedupConfig | None, info) -> DedupConfig | None:
        names = {s.name for s in info.data.get("sources") or []}
        if v is not None and v.dir is None and "dedup" in names:
            raise ValueError("a source is named 'dedup', the default dedup dir under shards_dir: rename the "
                             "source or set data.dedup.dir")
        return v

    def dedup_dir(self) -> str | None:
        """Where `norallm dedup` writes (data.dedup.dir, default <shards_dir>/dedup); None without dedup."""
        if self.dedup is None:
            return None
        return self.dedup.dir or f"{self.shards_dir}/dedup"

    @property
    def training_sources(self) -> list[SourceConfig]:
        """The sources the mixture trains on: all but the validation-only ones."""
        return [s for s in self.sources if not s.validation_only]
