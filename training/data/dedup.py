"""Glue between the config's ``data.dedup`` section and data_pipeline.dedup: the evaluation text
that decontamination checks against (lm-eval tasks through training.eval.harness, the listed files,
the validation-only sources — resolved here, on the training side, so that data_pipeline never
sees lm-eval), `norallm dedup`, and the check `norallm prepare` makes before tokenizing."""

from __future__ import annotations

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.contamination import file_passages
from data_pipeline.dedup import DedupOptions, dedup, is_current, reference_key
from data_pipeline.errors import DataError
from data_pipeline.sources import BadRecords, resolve_files
from data_pipeline.units import iter_documents, plan_units
from training.eval import harness


def _reference_key(data: DataConfig) -> str:
    """What the decontamination's evaluation text is made from (data_pipeline.dedup.reference_key)."""
    decon = data.dedup.decontamination
    if decon is None:
        return ""
    files = resolve_files(SourceConfig(name="decontamination", paths=decon.files)) if decon.files else []
    dev = [(s, plan_units(s, data.prepare_unit_bytes)) for s in data.sources if s.validation_only and decon.dev_sources]
    if not (decon.tasks or files or dev):
        raise DataError("data.dedup.decontamination has no evaluation text to check against: list tasks (e.g. "
                        "noreval-mc) or files, or add a validation-only source (valid_fraction: 1).")
    version = ""
    if decon.tasks:
        import importlib.metadata

        try:
            version = importlib.metadata.version("lm_eval")
        except importlib.metadata.PackageNotFoundError:
            version = "none"
    return reference_key(decon.ngram_words, harness.expand(decon.tasks), decon.include_path, files, dev, version)


def _reference_passages(data: DataConfig):
    """The evaluation text, read only when `norallm dedup` signs a unit: the lm-eval tasks' test and
    validation documents, the listed files, the validation-only sources."""
    decon = data.dedup.decontamination

    def passages():
        if decon.tasks:
            yield from harness.passages(decon.tasks, decon.include_path)
        if decon.files:
            bad = BadRecords()
            yield from file_passages(decon.files, decon.text_field, bad)
            if bad.total:
                print(f"[dedup] decontamination files: {bad.report()}", flush=True)
        for s in data.sources:
            if s.validation_only and decon.dev_sources:
                yield from ((s.name, d.text) for d in iter_documents(s))

    return passages


def dedup_options(data: DataConfig, progress: bool = True, workers: int = 1, task_index: int = 0,
                  num_tasks: int = 1) -> DedupOptions:
    return DedupOptions.from_config(data, _reference_key(data), progress=progress, workers=workers,
                                    task_index=task_index, num_tasks=num_tasks)


def run_dedup(data: DataConfig, progress: bool = True, workers: int = 1, task_index: int = 0,
              num_tasks: int = 1) -> dict | None:
    """`norallm dedup`: signatures of this task's units; without array tasks also the clustering
    pass (returns its state, else None)."""
    if data.dedup is None:
        raise DataError("the config has no data.dedup section: add one (`dedup: {}` takes the defaults) to "
                        "deduplicate before prepare.")
    opts = dedup_options(data, progress, workers, task_index, num_tasks)
    return dedup(data.training_sources, data.dedup_dir(), opts, _reference_passages(data))


def ensure_current(data: DataConfig, progress: bool = True, workers: int = 1, num_tasks: int = 1) -> None:
    """Before prepare: run `norallm dedup` when data.dedup is set and its result is missing or out
    of date; an array task (``num_tasks`` > 1) refuses instead, so that N tasks do not each run it."""
    if data.dedup is None or is_current(data.training_sources, data.dedup_dir(), dedup_options(data)):
        return
    if num_tasks > 1:
        raise DataError("data.dedup: the deduplication is missing or out of date. Run `norallm dedup CONFIG` "
                        "(array tasks: `--task-index I --num-tasks N`, then once without) before the prepare array.")
    run_dedup(data, progress, workers)
