# Bulkhead — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

BUF_VERSION             := v1.75.0
PROTOC_GEN_GO_VERSION   := v1.36.12
PROTOC_GEN_GRPC_VERSION := v1.6.2
PROTOVALIDATE_VERSION   := v1.2.2
GOLANGCI_LINT_VERSION   := v2.15.0

ROOT    := $(CURDIR)
BIN     := $(ROOT)/.build/bin
# Every module of the workspace, from go.work itself.
MODULE_DIRS := $(shell go list -m -f '{{.Dir}}')
MODULES     := $(addsuffix /...,$(MODULE_DIRS))

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

.PHONY: run
run: ## run the whole system on one machine (embedded NATS, all services)
	go run ./services/devstack

.PHONY: test
test: lint generate-check vet ## everything CI checks: buf lint, gofmt, golangci-lint, generated code, go vet, go test -race
	go test -race -count=1 -timeout 20m $(MODULES)

.PHONY: test-short
test-short: ## unit tests only (no e2e)
	go test -race -count=1 -short $(MODULES)

.PHONY: vet
vet: ## go vet every module
	go vet $(MODULES)

$(BIN)/buf:
	GOBIN=$(BIN) go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(BIN)/golangci-lint:
	GOBIN=$(BIN) go install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)
$(BIN)/protoc-gen-go:
	GOBIN=$(BIN) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
$(BIN)/protoc-gen-go-grpc:
	GOBIN=$(BIN) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GRPC_VERSION)

# The protovalidate schema comes from its Go module (the Go module proxy is
# reachable from CI; the Buf Schema Registry is not).
.build/protovalidate/buf/validate/validate.proto:
	@mkdir -p .build/protovalidate/buf/validate
	dir=$$(GOFLAGS=-mod=mod go mod download -json github.com/bufbuild/protovalidate@$(PROTOVALIDATE_VERSION) | sed -n 's/.*"Dir": "\(.*\)",/\1/p'); \
	  install -m 0644 $$dir/proto/protovalidate/buf/validate/validate.proto $@

.PHONY: tools
tools: $(BIN)/buf $(BIN)/protoc-gen-go $(BIN)/protoc-gen-go-grpc .build/protovalidate/buf/validate/validate.proto

.PHONY: lint
lint: tools $(BIN)/golangci-lint ## buf lint the protos, gofmt and golangci-lint the Go code
	$(BIN)/buf lint
	@unformatted=$$(gofmt -l $(MODULE_DIRS)); if [ -n "$$unformatted" ]; then \
	  echo "not gofmt-clean (run gofmt -w):"; echo "$$unformatted"; exit 1; fi
	@# golangci-lint runs per module: it does not span a workspace.
	@for dir in $(MODULE_DIRS); do echo "golangci-lint $$dir"; \
	  (cd $$dir && $(BIN)/golangci-lint run --config $(ROOT)/.golangci.yaml ./...) || exit 1; done

.PHONY: generate
generate: tools ## regenerate pkg/gen from proto/
	rm -rf pkg/gen
	$(BIN)/buf generate

.PHONY: generate-check
generate-check: generate ## fail when the committed generated code is stale
	@if [ -n "$$(git status --porcelain -- pkg/gen)" ]; then \
	  echo "generated code differs from the committed code; run make generate and commit:"; \
	  git status --porcelain -- pkg/gen; exit 1; fi

.PHONY: bench
bench: ## the noisy-neighbor benchmark (≈8 minutes; writes docs/bench/)
	go run ./e2e/cmd/bench scenario

.PHONY: bench-noisy
bench-noisy: ## the noisy-neighbor matrix, one line per shape (≈15 minutes; writes docs/bench/noisy.*)
	go run ./e2e/cmd/bench noisy

.PHONY: bench-throughput
bench-throughput: ## highest sustained throughput vs the floor relay
	go run ./e2e/cmd/bench throughput

.PHONY: demo
demo: ## a 60-second live view of isolation
	go run ./e2e/cmd/bench demo

.PHONY: clean
clean:
	rm -rf .build data
