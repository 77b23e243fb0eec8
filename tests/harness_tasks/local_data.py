"""Datasets of the test tasks, read from files next to this one (or shipped with norallm), so the
task dir works from any working directory and needs no network."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent
SMOKE = HERE.parents[1] / "data_pipeline" / "smoke_corpus"


def jsonl(file: str, **_) -> datasets.DatasetDict:
    """``dataset_kwargs: {file: NAME}``: NAME under this dir, or under the smoke corpus, as the test split."""
    path = HERE / file if (HERE / file).is_file() else SMOKE / file
    return datasets.load_dataset("json", data_files={"test": str(path)})
