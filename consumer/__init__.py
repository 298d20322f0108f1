"""The stream: a consumer-group member that polls a batch, runs the pipeline over it and checkpoints the outcome
(:mod:`consumer.app`, :mod:`consumer.pipeline`, :mod:`consumer.checkpoint`). Imports the model store, the scoring
path and the foundation."""
