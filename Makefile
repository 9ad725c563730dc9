# The two commands of the README. Each creates/updates the virtualenv at .venv and installs what it needs.
#   make test   run the test suite (offline, CPU)
#   make demo   run the pipeline offline on the tiny model
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean

# Reinstall only when a requirements file changed since the last install.
$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

# Debian's Chromium for the browser test (Playwright's own browser download is not used).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "install Chromium (Debian package 'chromium') for the browser test"; exit 1; }
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest

# Train (with a SIGKILL and a resume), export, chat, then serve the Space; DEMO_NO_LAUNCH=1 skips serving.
demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) outputs
