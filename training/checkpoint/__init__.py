"""Everything a run dir keeps across jobs: checkpoints written atomically and verified (``store``,
``manifest``), loaded as weights and never as code (``safe_load``), checked against the config
before loading (``resume_check``), converted for another number of ranks (``reshard``), and the
one-trainer-per-run-dir lock (``run_lock``).

May import: training.distributed, training.config, norallm. Never model/, data/, loop/, eval/:
a checkpoint is files and engine state, whatever model or data they came from."""
