# Shortcuts. The test command of record is `bash .ci/run` (CI runs exactly that).
help:             ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

.PHONY: help ci test test-deploy compose-config lint-docker image image-gpu up down

PYTHON ?= .venv/bin/python
TORCH_CUDA ?= cu128

ci:               ## set everything up (services, packages, .venv) and run all tests
	bash .ci/run

test:             ## all tests, in an existing .venv
	$(PYTHON) -m pytest -q -p no:cacheprovider --timeout=900 tests

test-deploy:      ## the deployment tests only (compose file, Dockerfile, standalone)
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/integration/test_deploy.py tests/integration/test_standalone.py

compose-config:   ## validate docker-compose.yml (placeholder secrets unless set)
	POSTGRES_PASSWORD=$${POSTGRES_PASSWORD:-check} MEDMAAS_SECRET_KEY=$${MEDMAAS_SECRET_KEY:-check} \
	MINIO_ROOT_PASSWORD=$${MINIO_ROOT_PASSWORD:-check-minio} \
		docker compose -f docker-compose.yml config --quiet && echo "docker-compose.yml is valid"

lint-docker:      ## hadolint the Dockerfile
	hadolint Dockerfile

image:            ## the CPU image (needs a Docker engine)
	docker build -t medmaas:latest .

image-gpu:        ## the GPU image with a CUDA build of torch (TORCH_CUDA=cu126|cu128|...)
	docker build -t medmaas-gpu:latest --build-arg TORCH_VARIANT=$(TORCH_CUDA) .

up:               ## start the production stack (needs .env with POSTGRES_PASSWORD and MEDMAAS_SECRET_KEY)
	docker compose up -d --build

down:
	docker compose down
