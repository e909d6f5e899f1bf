# Thin targets; the logic lives in lib/ and scripts/.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(EXTRAS)
EXTRAS ?= book,test

.PHONY: book test gpu-test reproduce wheelhouse clean venv pdf bundle

venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

## book: make a venv, install, build the whole book from committed data (CPU only)
# The execution cache keys on a chapter's code cells only, and Sphinx re-reads only changed
# sources: after a change to lib/ or data/, or after a failed build (no stamp), start clean so
# every chapter runs again on the current code and data.
book: venv
	@if [ -d _build ] && { [ ! -f _build/.inputs-stamp ] || [ -n "$$(find lib data -newer _build/.inputs-stamp -print -quit)" ]; }; then \
	  echo "lib/ or data/ changed, or the last build failed: building from scratch"; \
	  rm -rf _build/.jupyter_cache _build/.doctrees _build/jupyter_execute _build/html; fi
	$(VENV)/bin/jupyter-book build . -W --keep-going -q
	@touch _build/.inputs-stamp
	@echo "Open: file://$(CURDIR)/_build/html/index.html"

## pdf: the whole book as one PDF (Chromium prints each page; pypdf joins them) -> _build/book.pdf
pdf: book
	bash scripts/ensure-chromium
	$(PY) scripts/book_pdf.py

## bundle: the built HTML as one archive a reader can host anywhere -> _build/book-html.tar.gz
bundle: book
	tar czf _build/book-html.tar.gz -C _build html
	@echo "Static site: _build/book-html.tar.gz (unpack and serve html/, e.g. python -m http.server)"

## test: make a venv, install, run the test suite (GPU tests skip without a GPU)
test: venv
	bash scripts/ensure-chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

## gpu-test: the GPU tests alone, on a GPU node with the node's own python (no venv, no book)
gpu-test:
	$(PYTHON) -m pytest -q -m gpu -p no:cacheprovider $(PYTEST_ARGS)

## reproduce: rerun every experiment chapter on a GPU (mode=run), then rebuild the book
reproduce:
	$(PYTHON) -m lib reproduce $(CHAPTERS) $(PARAMS)

## wheelhouse: wheels + kernel-only vLLM for an offline GPU node
wheelhouse:
	$(PYTHON) -m lib wheelhouse $(WHEELHOUSE_ARGS)

clean:
	rm -rf _build .jupyter_cache
