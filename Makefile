# The two commands of the README, and the small steps they are made of.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install install-dev sync check-sync lab outputs data docs

RUN_DIR ?= runs/pipeline-quick
run: install  ## install everything, then run the main job: every lesson on the bundled model (finetune-lab run --profile quick)
	$(BIN)/finetune-lab model prepare
	$(BIN)/finetune-lab run --profile quick --out $(RUN_DIR) --resume

docs: install  ## build the docs site into _docs (no Quarto needed); open _docs/index.html
	$(BIN)/finetune-lab docs --out _docs

test: install-dev  ## install what the tests need, then run the whole test suite
	$(BIN)/nbdev-test --n-workers 2
	$(BIN)/pytest -n 2 --dist loadfile

install:
	bash tools/setup.sh tutorial

install-dev:
	bash tools/setup.sh dev

sync:  ## notebooks -> library and README, and clean notebooks
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	$(BIN)/python tools/readme.py

check-sync: sync  ## fail if the notebooks, library and README were not in sync
	@git status --porcelain -- nbs finetune_lab README.md | grep . && { echo "notebooks, library or README not in sync (run make sync and commit)"; exit 1; } || echo "in sync"

lab: install  ## open the lessons in JupyterLab
	$(BIN)/jupyter lab nbs

NBS ?= 00_core.ipynb 01_models.ipynb 02_data.ipynb 02a_metrics.ipynb 02b_train.ipynb 03_sft.ipynb 03a_recipe.ipynb 03b_noise.ipynb 03c_datasize.ipynb 03d_regularise.ipynb 03e_convergence.ipynb 03f_federated.ipynb 04_dpo.ipynb 05_rlhf.ipynb 06_evaluate.ipynb 06a_bench.ipynb 06b_deploy.ipynb 06c_compress.ipynb 06d_hpo.ipynb 06e_cost.ipynb 06f_distributed.ipynb 07_pipeline.ipynb 08_cli.ipynb 08a_reliability.ipynb 09_docs.ipynb index.ipynb
outputs: install-dev  ## re-run notebooks on the real model (parameters-cell defaults) and keep their outputs
	$(BIN)/nbdev-export
	cd nbs && for nb in $(NBS); do FINETUNE_LAB_PROGRESS=0 ../$(BIN)/papermill --no-progress-bar $$nb $$nb || exit 1; done
	$(MAKE) sync

data:  ## regenerate the shipped dataset (seeded: the same files every time)
	$(BIN)/python data/make_tickets.py
