"""Getting a run onto a cluster: Slurm scripts rendered from cluster profiles (``slurm``,
``profiles``), the checks every rank runs before training (``preflight``) and the torchrun
wrapper that keeps norallm's exit codes (``torchrun_node``). Nothing here trains a model."""
