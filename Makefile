# Two commands: `make bench` (the whole study, 01 to 06, on the default data) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Quick by default: the first 2 manifest cases in 03/04, the first in 05 (eleven variants; bf16 rows skip where the CPU lacks bf16); FULL=1 runs every
# case and variant with a warm-up and 3 repeats.
ifeq ($(FULL),1)
BENCH_ARGS ?= --repeats 3 --warmup 1
OPT_ARGS   ?=
PROD_ARGS  ?= --max-cases 3 --repeats 3
else
BENCH_ARGS ?= --repeats 1 --warmup 0 --max-cases 2
OPT_ARGS   ?= --max-cases 1 --variants exact_ort_tuned_stages,exact_ov_f32,exact_ov_f32_split_concat,exact_ov_f32_fused_head,approx_ov_f32_onepass_norm,approx_ov_bf16,approx_ov_bf16_bodycrop,approx_ov_bf16_whole,approx_ov_int8_whole,approx_ov_f32_air_tiles,approx_ov_int8_f32,approx_ov_int8_mixed
PROD_ARGS  ?=
endif

.PHONY: bench test setup rust clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e . >/dev/null
	touch $(STAMP)

setup: $(STAMP)

rust: $(STAMP)
	@if [ -f rust/setup.sh ]; then bash rust/setup.sh; else echo "rust/: no setup script, Rust row skipped"; fi

bench: $(STAMP) rust
	$(PY) 01_download_data.py $(if $(wildcard ../shared/data/example_ct.nii.gz),--from-dir ../shared/data)
	$(PY) 02_export_model.py
	$(PY) 03_vanilla_benchmark.py $(BENCH_ARGS)
	$(PY) 04_onnx_benchmark.py --impl onnx,rust $(BENCH_ARGS)
	$(PY) 05_optimized_python_benchmark.py $(BENCH_ARGS) $(OPT_ARGS)
	$(PY) 06_linux_production_benchmark.py $(PROD_ARGS)
	@echo "Done: see benchmarks/SUMMARY.md"

# pytest -ra lists each skip with its reason and tests/conftest.py ends with one line "skipped: N (reasons)";
# without cargo the Rust tests are said skipped here too.
test: $(STAMP) rust
	$(PY) -m ruff check common totalseg_fast tests tools *.py
	$(PY) -m pytest -q -ra tests
	@if command -v cargo >/dev/null && [ -f rust/Cargo.toml ]; then cd rust && cargo test --offline --release -q; \
	else echo "skipped: cargo test (rust/): cargo not found"; fi

# only what the scripts generate: the data, benchmark outputs, and models/ except the committed proxy weights
clean:
	rm -rf ct_data
	if [ -d benchmarks ]; then find benchmarks -type d -name outputs -prune -exec rm -rf {} +; fi
	if [ -d models ]; then find models -mindepth 1 -maxdepth 1 ! -name proxy -exec rm -rf {} +; fi
