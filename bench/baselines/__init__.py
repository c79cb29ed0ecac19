"""Baseline apps bench/serve.py measures next to the gateway, on the same FastAPI/uvicorn stack."""
