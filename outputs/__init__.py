"""The people-facing outputs: the live dashboard and the webhook notifier, readers of the stream\x27s topics."""
