"""norallm's exit codes, once: the trainer, the torchrun wrapper, the watchdog and the rendered
Slurm scripts (training.launch.render fills them into ``@EXIT_...@``) all read them from here.
Plain constants, no imports, so that the lightest launcher can use them."""

EXIT_USER_ERROR = 2  # a NorallmError: the CLI printed one `error:` line; fix the input, do not requeue
EXIT_REQUEUE = 42  # a signal-triggered checkpoint was saved on every rank: requeue the job
EXIT_NODE_LOST = 43  # another node stopped answering (training.liveness): requeue without that node
