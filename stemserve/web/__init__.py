"""``stemserve web``: the upload page and HTTP API over the same client library as the CLI."""
from stemserve.web.app import create_app
from stemserve.web.server import serve
from stemserve.web.settings import Settings

__all__ = ["Settings", "create_app", "serve"]
