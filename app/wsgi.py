"""WSGI entry point for plain WSGI servers: `gunicorn app.wsgi:app`. There, an open SSE stream
holds a worker thread; `medmaas web` serves app.asgi instead, where it does not."""

from app import create_app

app = create_app()
