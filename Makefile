# Titan Plugin Manager. A new user types `make up`, then `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(PY) titan-plugins.py
RUN_DIR ?= run
FILES_DIR ?= /srv/titan/files
# integration test files run in this many parallel streams (pytest-xdist, a file each):
# more than the cores, as most of a test's time is spent waiting on containers and daemons
TEST_STREAMS ?= 4
export TITAN_RUN_DIR ?= $(CURDIR)/$(RUN_DIR)
# The Redis URL (with its password) that `make up` generated, for Flower and the CLI tools.
# Marked as the file's copy: the scripts read the file fresh instead (a mode switch rewrites
# it), and judge only a URL the caller's own environment gave (scripts/common.sh).
ifeq ($(origin TITAN_REDIS_URL),undefined)
export TITAN_REDIS_URL_FROM_RUN := 1
endif
export TITAN_REDIS_URL ?= $(shell cat $(TITAN_RUN_DIR)/redis.url 2>/dev/null)
# Redis over TLS (HA, worker hosts): the tools here present the manager's certificate.
ifneq ($(filter rediss://%,$(TITAN_REDIS_URL)),)
export TITAN_REDIS_TLS_CA ?= $(TITAN_RUN_DIR)/tls/trust.crt
export TITAN_REDIS_TLS_CERT ?= $(TITAN_RUN_DIR)/tls/clients/manager.crt
export TITAN_REDIS_TLS_KEY ?= $(TITAN_RUN_DIR)/tls/clients/manager.key
endif

.PHONY: up down deps services image plugins-up plugins-down plugins-list plugins-reload \
        plugins-logs status flower test test-deps console-shots unit lint bench soak soak-ha compose-up compose-down \
        worker-cert tls-check tls-rotate-ca tls-retire-ca tls-rotate-server redis-rotate-password \
        redis-retire-password

up: deps services image ## install what is missing, start Redis, Docker, manager and workers
	@mkdir -p $(FILES_DIR)
	@bash scripts/stack.sh start

down: plugins-down ## stop everything `make up` started
	@bash scripts/services.sh stop

deps:
	@bash scripts/bootstrap.sh

test-deps:  # what `make deps` installs, and the browser the console's tests drive
	@bash scripts/bootstrap.sh tests

services: deps
	@bash scripts/services.sh start

image: services
	@bash scripts/image.sh

plugins-up: ## start the manager and two workers (Redis and Docker must answer)
	@bash scripts/stack.sh start

plugins-down:
	@bash scripts/stack.sh stop

plugins-list:
	@$(CLI) list

plugins-reload:
	@$(CLI) reload

plugins-logs:
	@tail -n 50 -F $(RUN_DIR)/manager.log $(RUN_DIR)/worker*.log

status:
	@bash scripts/stack.sh status
	@$(CLI) health || true

flower: ## where Flower is (make up starts it on 127.0.0.1:5555, behind basic auth)
	@echo "Flower: http://127.0.0.1:$${TITAN_FLOWER_PORT:-5555}  (user:password in $(RUN_DIR)/flower.auth, root only)"

lint: deps
	@$(VENV)/bin/ruff check .

test: test-deps ## every test: the fast layer, then integration with real Redis, Celery and Docker
	@$(MAKE) --no-print-directory unit
	@bash scripts/services.sh docker
	@bash scripts/image.sh
	@$(PY) -m pytest -q -m integration -n $(TEST_STREAMS) --dist loadfile --no-loadscope-reorder \
		--timeout 600 --durations=20 $(PYTEST_ARGS)

# The fast layer: pure logic and the Lua scripts on a real (private) Redis; no Docker, no
# Celery workers (no engine is reachable: a test that reaches for one fails).
unit: deps
	@$(VENV)/bin/ruff check .
	@DOCKER_HOST=unix:///nonexistent/no-docker-in-the-fast-layer \
		$(PY) -m pytest -q -m "not integration" -n 2 --durations=5 $(PYTEST_ARGS)

console-shots: test-deps ## the console's pages at 1280x800 in docs/console/ (its browser test)
	@bash scripts/services.sh docker
	@bash scripts/image.sh
	@mkdir -p docs/console
	@TITAN_CONSOLE_SHOTS=$(CURDIR)/docs/console $(PY) -m pytest -q -p no:cacheprovider \
		-m integration tests/test_console.py -k browser

bench: deps ## end-to-end latency and throughput vs. bare Docker runs
	@bash scripts/services.sh docker
	@bash scripts/image.sh
	@$(PY) bench/bench.py $(BENCH_ARGS)

compose-up: deps ## the same parts as containers (compose.yaml), 3 workers; images built here
	@bash scripts/compose.sh up

compose-down: ## stop and remove the compose project and what its workers started
	@bash scripts/compose.sh down

soak: deps ## 2,000 events, 3 plugins, 2 workers, a worker SIGKILLed twice: nothing lost or doubled
	@bash scripts/services.sh docker
	@bash scripts/image.sh
	@$(PY) bench/soak.py $(SOAK_ARGS)

soak-ha: deps ## the soak with Redis behind Sentinel (TLS): the primary SIGKILLed, nobody restarting it
	@bash scripts/services.sh docker
	@bash scripts/image.sh
	@$(PY) bench/soak.py --ha $(SOAK_ARGS)

# Redis across hosts (docs/architecture.md, Add worker hosts and Rotation).
worker-cert: ## a worker host's bundle (certificate, key, CA, settings) as a tar on stdout
	@test -n "$(NAME)" || { echo "usage: make -s worker-cert NAME=worker-b > worker-b.tar" >&2; exit 2; }
	@test -s $(TITAN_RUN_DIR)/redis.remote.env || { echo "Redis listens on this host only: start it with TITAN_REDIS_BIND=<private address> make up" >&2; exit 1; }
	@$(CLI) tls bundle "$(NAME)" --env $(TITAN_RUN_DIR)/redis.remote.env

tls-check: ## when each certificate of run/tls expires (exit 1 within 30 days)
	@$(CLI) tls check

tls-rotate-ca tls-retire-ca tls-rotate-server redis-rotate-password redis-retire-password:
	@bash scripts/tls.sh $(@:tls-%=%)
