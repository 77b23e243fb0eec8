"""The project's exception types. Every error a user can cause derives from NorallmError.

Messages say what is wrong *and* what to change; the CLI prints them without a traceback.
"""


class NorallmError(Exception):
    """Base class for errors caused by user input (configs, files, command-line arguments)."""


class DataError(NorallmError):
    """A data source, tokenizer or shard set that cannot be used as given."""
