# The README's Quick start: `make demo` runs the main job, `make test` the whole suite.
PY := .venv/bin/python

.PHONY: setup demo demo-machine demo-local test test-unit test-fast lint bench clean agent-wheel

setup:
	./scripts/setup.sh

# The whole story as root: an agent user builds and launches the VM, the host takes it over,
# the agent asks for a secret, an approver approves, the agent retrieves it once (scripts/demo.py).
demo: setup
	$(PY) scripts/demo.py

# The same story with the agent in a machine of its own (namespaces and sshd on a bridge, as Multipass or
# libvirt give it): its VM nested there, taken over through SSH, served back on the bridge.
demo-machine: setup
	$(PY) scripts/demo.py --agent-machine

# Only the proxy, on loopback, without a VM: one request, a CLI approval, one retrieval.
demo-local: setup
	$(PY) -m proxy demo

test: setup
	$(PY) -m pytest -v --durations=15

# Lint and types (CI runs this before the tests): ruff for lint and format; mypy strict for every package.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy --strict proxy vm_image takeover

# The unit tier: neither root nor VMs (seconds to a couple of minutes); `make test` runs everything.
test-unit: setup
	$(PY) -m pytest -q -m "not slow and not root"

test-fast: setup
	$(PY) -m pytest -v -m "not slow"

# The agent's tools alone (proxy/agent/wheel.py; standard library only, so no setup): build/secret_proxy_agent-*.whl
AGENT_WHEEL_DIR ?= build
agent-wheel:
	python3 -m proxy.agent.wheel $(AGENT_WHEEL_DIR)

bench: setup
	$(PY) bench/bench_api.py --rounds 5 --seconds 3

# Stops and removes the demo's VMs, their files and the demo users, then the venv.
clean:
	if [ -x $(PY) ]; then $(PY) scripts/demo.py --clean; fi
	rm -rf .venv .pytest_cache
