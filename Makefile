# The README's two commands: `make quickstart` and `make test`. Each creates .venv and installs
# what is missing first, so either works alone on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: quickstart test lint data install clean

quickstart: $(STAMP) data
	$(BIN)/bdray run configs/quickstart.yaml --out runs/quickstart

test: $(STAMP)
	-@$(MAKE) --no-print-directory data 2>/dev/null || echo "(Fashion-MNIST not installed; tests use generated data)"
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# Real Fashion-MNIST from Debian's package (offline-friendly); only attempted as root with apt.
data:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing dataset-fashion-mnist with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' or set data.root"; exit 1; \
	fi

clean:
	rm -rf .bdray runs
