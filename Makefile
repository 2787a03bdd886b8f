# The two set-up commands of the README. Each creates/updates .venv on its own.
.PHONY: demo test lint

demo:
	./scripts/bootstrap.sh
	HF_HUB_OFFLINE=1 .venv/bin/steerx eval --data health_tweets --users 6 --out runs/demo

test:
	./scripts/bootstrap.sh
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check src tests benchmarks
