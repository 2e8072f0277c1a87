.PHONY: demo test lint bench setup
setup:
	scripts/setup.sh
demo:
	scripts/demo.sh
test:
	scripts/test.sh
lint: setup
	.venv/bin/ruff check src tests bench && .venv/bin/mypy
bench: setup
	scripts/bench-deps.sh
	.venv/bin/python -m bench $(BENCH_ARGS)
