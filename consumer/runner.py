"""Assemble a StreamApp from settings: the backend, every route's chosen adapter and the app."""

from __future__ import annotations

from consumer.app import StreamApp
from core.settings import Settings
from model_store.loading import load_backend


def build_app(settings: Settings) -> StreamApp:
    app = StreamApp(settings, load_backend(settings))
    app.routes.choose_adapters()
    return app
