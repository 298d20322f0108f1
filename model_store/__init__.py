"""The model store: data loaders, the retrieval index, training, evaluation and the sweep, base models, the adapter
registry and loading. Imports the scoring path and the foundation."""
