"""Assemble a StreamApp from settings: the backend, the adapter and the app."""

from __future__ import annotations

from consumer.app import StreamApp
from erc_stream.settings import Settings
from model_store.loading import load_backend, resolve_adapter


def build_app(settings: Settings) -> StreamApp:
    backend = load_backend(settings)
    adapter = None
    if settings.model.adapter and settings.model.backend != "null":
        adapter = resolve_adapter(settings.model.adapter, settings.store.dir).name
    return StreamApp(settings, backend, adapter=adapter)
