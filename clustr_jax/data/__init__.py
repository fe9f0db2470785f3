"""Datasets: released file formats, the generators that benchmarks publish, Grain pipelines.

``listops``  the LRA ListOps generator, tokenizer, evaluator and TSV reader.
``pipeline`` deterministic, per-process sharded, checkpointable Grain train and eval iterators.
"""
