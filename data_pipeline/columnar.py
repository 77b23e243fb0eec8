"""Columnar sources: Parquet files (read with pyarrow, one record batch at a time) and HF
``datasets`` (local dirs, ``save_to_disk`` dirs, or hub ids where the network allows), streamed.

Bad values are counted like bad JSONL lines (null → ``non_string_text``, undecodable bytes →
``invalid_utf8``, blank → ``empty_text``); a file that cannot be read at all is an error naming it,
never a silent loss of all its documents.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataError
from data_pipeline.sources import MAX_LINE_BYTES, BadRecords, Document
from norallm.files import expand_path

_BATCH_ROWS = 1024


def _parquet_file(spec: SourceConfig, path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"source '{spec.name}': cannot read Parquet file {path} ({e}). Replace it (re-download), or "
            "leave it out of the source's paths."
        ) from e


def parquet_row_groups(spec: SourceConfig, path: Path) -> list[int]:
    """Uncompressed byte size of each row group of a Parquet file (its work-unit granularity)."""
    meta = _parquet_file(spec, path).metadata
    return [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]


def _check_text_column(spec: SourceConfig, path: Path, schema) -> None:
    import pyarrow as pa

    if spec.text_field not in schema.names:
        raise DataError(
            f"source '{spec.name}': Parquet file {path} has no column '{spec.text_field}' (it has "
            f"{', '.join(schema.names)}); set text_field in data.sources to the text column."
        )
    kind = schema.field(spec.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or str(kind) in ("string_view", "binary_view")):
        raise DataError(
            f"source '{spec.name}': column '{spec.text_field}' of {path} is {kind}, not text; set text_field "
            "to a string column."
        )


def _value_text(value, where: str, bad: BadRecords, max_bytes: int) -> str | None:
    if value is None:
        bad.add("non_string_text", where, "null")
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add("invalid_utf8", where, f"byte {e.start}")
            return None
    if len(value) > max_bytes:  # characters ≤ bytes: a cheap lower bound
        bad.add("document_too_long", where, f"more than {max_bytes:,} bytes")
        return None
    if not value.strip():
        bad.add("empty_text", where)
        return None
    return value


def iter_parquet(
    spec: SourceConfig,
    path: Path,
    bad: BadRecords,
    first_group: int = 0,
    stop_group: int | None = None,
    max_bytes: int = MAX_LINE_BYTES,
    position: list[int] | None = None,
) -> Iterator[Document]:
    """Documents of row groups ``[first_group, stop_group)`` of one Parquet file, in row order.
    ``position[0]`` advances by each finished row group's byte size."""
    import pyarrow as pa

    pf = _parquet_file(spec, path)
    _check_text_column(spec, path, pf.schema_arrow)
    meta = pf.metadata
    stop_group = meta.num_row_groups if stop_group is None else stop_group
    row = sum(meta.row_group(i).num_rows for i in range(first_group))
    for group in range(first_group, stop_group):
        try:
            batches = pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group], columns=[spec.text_field])
            for batch in batches:
                for value in batch.column(0).to_pylist():
                    bad.records_seen += 1
                    text = _value_text(value, f"{path}#row{row}", bad, max_bytes)
                    if text is not None:
                        yield Document(text, spec.name, str(path), row)
                    row += 1
        except (pa.ArrowException, OSError) as e:
            raise DataError(
                f"source '{spec.name}': row group {group} of Parquet file {path} cannot be read ({e}). "
                "Replace the file, or leave it out of the source's paths."
            ) from e
        if position is not None:
            position[0] += meta.row_group(group).total_byte_size


def open_hf(spec: SourceConfig, path: str):
    """A streaming (iterable) HF dataset for one path of an ``hf`` source."""
    import datasets

    local = Path(expand_path(path))
    try:
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():  # save_to_disk
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.hf_split]
            return ds.to_iterable_dataset(num_shards=max(1, len(ds.cache_files)))
        return datasets.load_dataset(
            str(local) if local.exists() else path, name=spec.hf_subset, split=spec.hf_split, streaming=True
        )
    except Exception as e:  # datasets raises many unrelated types (hub, fsspec, arrow, KeyError)
        raise DataError(
            f"source '{spec.name}': cannot open HF dataset '{path}' (split '{spec.hf_split}'): "
            f"{type(e).__name__}: {e}. Give a local dataset dir, or run where the hub is reachable "
            "(HF_HUB_OFFLINE=1 forbids downloads)."
        ) from e


def hf_shards(spec: SourceConfig, path: str) -> int:
    """How many shards (data files) the dataset streams from: its work-unit granularity."""
    return max(1, open_hf(spec, path).n_shards)


def iter_hf(
    spec: SourceConfig, path: str, bad: BadRecords, shard: int = 0, max_bytes: int = MAX_LINE_BYTES
) -> Iterator[Document]:
    """Documents of one shard of an HF dataset, in its order."""
    ds = open_hf(spec, path)
    if ds.n_shards > 1:
        ds = ds.shard(num_shards=ds.n_shards, index=shard, contiguous=True)
    row = 0
    try:
        for record in ds:
            bad.records_seen += 1
            where = f"{path}[shard {shard}]#row{row}"
            row += 1
            if spec.text_field not in record:
                bad.add("missing_text_field", where, f"no '{spec.text_field}' column")
                continue
            value = record[spec.text_field]
            if value is not None and not isinstance(value, str | bytes):
                bad.add("non_string_text", where, f"'{spec.text_field}' is {type(value).__name__}")
                continue
            text = _value_text(value, where, bad, max_bytes)
            if text is not None:
                yield Document(text, spec.name, path, row - 1)
    except DataError:
        raise
    except Exception as e:  # a corrupt data file surfaces as whatever its builder raises
        raise DataError(
            f"source '{spec.name}': HF dataset '{path}' shard {shard} failed after {row} rows: "
            f"{type(e).__name__}: {e}. For JSONL with bad lines use format: jsonl, which counts them."
        ) from e
