# Every target sets itself up: a fresh Debian/Ubuntu machine needs nothing but python3.11 and make.
.PHONY: run test lint openapi bench clean venv system

venv:
	@scripts/ensure-venv

system:
	@scripts/ensure-system-packages

run: venv system
	@scripts/run-local

test: venv system
	@scripts/test

lint: venv
	@scripts/lint

openapi: venv
	.venv/bin/python -m service.openapi > openapi.yaml

bench: venv system
	.venv/bin/python -m bench.serve
	.venv/bin/python -m bench.train

clean:
	rm -rf .venv var .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
