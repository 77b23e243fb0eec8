"""The data pipeline's exception: a source, tokenizer or shard set that cannot be used as given.
It derives from the project's root, ``norallm.errors.NorallmError``."""

from norallm.errors import NorallmError


class DataError(NorallmError):
    """A data source, tokenizer or shard set that cannot be used as given."""
