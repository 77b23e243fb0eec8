"""What every part of norallm shares and nothing else: the root exception (``errors``) and the
file helpers (``files``: atomic writes, fingerprints, path expansion). ``data_pipeline`` and
``training`` both import it; it imports neither."""
