"""The fact embedding: its config, data, model, training run, evaluation and retrieval metrics."""
