"""What every part of norallm shares and nothing else: the root exception (``errors``), the
file helpers (``files``: atomic writes, fingerprints, path expansion) and the base of the config
sections (``section``). ``data_pipeline`` and ``training`` both import it; it imports neither."""
