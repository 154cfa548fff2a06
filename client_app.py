"""Flower ClientApp: the handlers live in fedapps.client, one per message type."""

from fedapps.client import build_client_app

app = build_client_app()
