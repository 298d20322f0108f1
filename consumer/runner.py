"""Assemble a StreamApp from settings: the backend, the chosen adapter and the app."""

from __future__ import annotations

from consumer.app import StreamApp
from erc_stream.settings import Settings
from model_store.loading import choose_adapter, load_backend


def build_app(settings: Settings) -> StreamApp:
    app = StreamApp(settings, load_backend(settings))
    app.labeler.use(choose_adapter(settings))
    return app
