"""The training loop and what only it uses: ``trainer`` (train(): claim the run dir, set up, steps,
and what the policies say is due; ``train_step``), ``setup`` (data, model, engine and the resumed
checkpoint for a run), ``state`` (TrainState: the step and tokens, as a state_dict), ``run_dir``
(RunDir: the lock, config.yaml, resumes.jsonl, metrics cut back on resume), ``policies``
(Evaluator and Checkpointer, each deciding when it is due), ``engine`` (the DeepSpeed config and
engine, the learning rate), ``guard`` (divergence), ``metrics`` (metrics.jsonl, progress lines, MFU)
and ``signals`` (stop requests).

The top of the training side: may import every package below it (model/, checkpoint/, data/,
eval/) and training.config/distributed/liveness. Only launch/ and the CLI import it."""
