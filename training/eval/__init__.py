"""Measuring a model: loss and perplexity on validation sets and JSONL files (``perplexity``),
lm-evaluation-harness tasks such as NorEval (``harness``), plots of a run (``report``).

May import: model/, checkpoint/, training.export, training.distributed. Never data/ or loop/:
training hands it the validation sets it has built."""
