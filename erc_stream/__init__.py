"""erc-stream's shell: the ``erc-stream`` command (:mod:`erc_stream.cli`, one module per command group), the demo,
the export for BI, the report and the configuration reference. It sits on top and may import every other part;
nothing imports it (README, "Where things are")."""
