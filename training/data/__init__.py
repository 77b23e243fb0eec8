"""What a config trains on, on the training side of data_pipeline: ``modes`` (pretraining or
SFT: the one place that tells them apart), ``pretraining`` (tokenizer, prepare, plan, the
training loader and validation sets over prepared shards), ``sft`` (the chat tokenizer and
packed conversations), ``chat`` (NorMistral-instruct's chat format), ``dedup`` (the evaluation
text for decontamination, `norallm dedup`).

May import: data_pipeline, training.config, training.distributed, and eval.harness for the
evaluation tasks' text. Never model/, checkpoint/ or loop/."""
