"""nanogpt_core: the training library (model, tokenizer, shards, trainer, evaluation).

It never imports dagster, fastapi or uvicorn: the pipeline and the server build on it.
"""

__version__ = "0.1.0"
