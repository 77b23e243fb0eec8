"""The training loop and what only it uses: ``trainer`` (train(): set-up, resume, steps, the eval
and save policies), ``setup`` (data, model, engine for a run), ``run_dir`` (the run dir's
bookkeeping and lock), ``engine`` (the DeepSpeed config and engine), ``schedule`` (the learning
rate, a pure function of the step), ``guard`` (divergence), ``metrics`` (metrics.jsonl, the
console, MFU) and ``signals`` (stop requests).

The top of the training side: may import every package below it (model/, checkpoint/, data/,
eval/) and training.config/distributed/liveness. Only launch/ and the CLI import it."""
