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
.PHONY: fuzz soak
# Coverage-guided fuzzing (atheris) of every untrusted-input parser: SECONDS per target, TARGETS optional.
fuzz:
	SECONDS_PER_TARGET=$(or $(SECONDS),10) .venv/bin/python fuzz/run.py "$(TARGETS)"
# Long form of the reliability and fault suites (bigger counts, held longer; the seed soak for
# ZT_SOAK_SECONDS, 600 by default; 10,000 held tunnels and ZT_LOAD_RATE new connections/s through two node
# proxies): figures in $(ZT_RELIABILITY_FIGURES). SOAK_SUITES narrows it.
soak:
	scripts/soak.sh
