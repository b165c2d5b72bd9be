"""Integrations with the training pipelines users already run (``transformers.Trainer``, TRL)."""
