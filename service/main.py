"""The ASGI app uvicorn serves (`uvicorn service.main:app`: Dockerfile, scripts/run-local, bench, tests)."""

from service.app import create_app, make_producer

__all__ = ["app", "create_app", "make_producer"]

app = create_app()
