# The two set-up commands of the README. Each creates/updates .venv on its own.
.PHONY: demo test lint

demo:
	./scripts/bootstrap.sh
	@start=$$(date +%s); \
	HF_HUB_OFFLINE=1 .venv/bin/steerx eval --data health_tweets --out runs/demo && \
	echo "make demo: $$(( $$(date +%s) - start )) s wall (16 users, every method and control)"

test:
	./scripts/bootstrap.sh
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check src tests benchmarks
