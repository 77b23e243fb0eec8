"""The model side: families and flavors (``families``, plain data, no torch), building a model from
them (``build``: scratch init, warm start; ``partitioned``: the ZeRO-3 builds; ``transplant``: a
new vocabulary on a base model), attention (``alibi``: BLOOM's fused ALiBi; ``packing``: packed
documents), kernels (``kernels``: the chunked loss, liger) and the loss of a batch (``loss``).

May import: training.distributed, data_pipeline.batch, norallm. Never checkpoint/, data/, loop/,
eval/ or launch/: a model knows nothing of how it is trained or saved."""
