"""The root of norallm's exceptions. Every error a user can cause derives from NorallmError.

Messages say what is wrong *and* what to change; the CLI prints them without a traceback (exit
2). The data pipeline's own kind is ``data_pipeline.errors.DataError``; the trainer's are
``training.config.ConfigError`` and ``training.checkpoint.store.CheckpointError``.
"""


class NorallmError(Exception):
    """Base class for errors caused by user input (configs, files, command-line arguments)."""
