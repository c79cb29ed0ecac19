"""Real processes for tests and benchmarks: redis-server, celery workers and the uvicorn gateway, started and
stopped by the caller (pytest fixtures in tests/, scripts in bench/)."""
