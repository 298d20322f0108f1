"""erc-stream: real-time emotion recognition in conversation (InstructERC) as a Kafka stream processor.

Shared core: the one settings object (:mod:`erc_stream.settings`), the one schema module
(:mod:`erc_stream.schemas`), label sets (:mod:`erc_stream.labels`), local services and the CLI.
The stream itself lives in :mod:`consumer`, the replayer in :mod:`producer_sim`, and models,
prompts and backends in :mod:`model_store`.
"""

__version__ = "0.1.0"
