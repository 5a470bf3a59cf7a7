# netbpf: every target runs the idempotent set-up first, so each works on a fresh machine.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-unit demo bench clean-lab man

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -n 4 --dist loadfile $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

demo: setup
	$(PY) -m netbpf.demo

bench: setup
	$(PY) bench/run.py

clean-lab: setup
	.venv/bin/netbpf lab down --all

man: setup
	@.venv/bin/python -m netbpf.cli.manpages docs/man
