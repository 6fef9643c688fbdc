# Two entry points on a fresh machine: `make lab` (the main job) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: lab test test-slow bench browser clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,lab]"
	touch $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/normkit lab --quick

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/normkit bench --quick

# headless Chromium (and CJK fonts for the article's quotes) for the slow test that opens report.html in a real browser
browser:
	apt-get update && apt-get install -y chromium fonts-noto-cjk

clean:
	rm -rf $(VENV) build src/*.egg-info
