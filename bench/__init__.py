"""The benchmarks, installed with the package: ``erc-stream bench`` (:mod:`bench.scoring_paths`) and the scripts run
as modules (``python -m bench.scale_out ...``). Commands and figures: docs/benchmarks.md."""
