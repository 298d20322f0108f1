"""The foundation: settings, records, label sets, logs and the readers of the output topics. Imports nothing else of the project."""
