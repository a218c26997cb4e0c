# Two commands from a fresh clone:
#   make demo   set up .venv, fit a demo model on the synthetic carpet set, serve it
#   make test   the test suite exactly as CI runs it (.ci/run: fresh venv, lint, pytest)
#   make container-check   build the CPU image and run it as deploy/k8s/ runs it (podman or docker)
# Python 3.11 or newer, picked as .ci/run picks it (.ci/python says when there is none).
PYTHON ?= $(shell .ci/python)
PORT ?= 3000

.PHONY: demo test container-check

demo: .venv/.installed
	.venv/bin/python -m detector demo --out demo --serve --port $(PORT)

test:
	bash .ci/run

container-check: .venv/.installed
	.venv/bin/python -m deploy.container_check

# requirements-dev.txt: what the README's later steps run (Locust, pytest, ruff) too.
.venv/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@test -n "$(PYTHON)" || .ci/python
	$(PYTHON) -m venv .venv
	.venv/bin/pip install -q -r requirements-dev.txt
	.venv/bin/pip install -q --no-deps -e .
	touch $@
