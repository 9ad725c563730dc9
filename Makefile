# The two commands of the README. Each creates/updates the virtualenv at .venv and installs what it needs.
#   make test   run the test suite (offline, CPU): every tier; what CI and the README run
#   make check  the fast lane: every test but the slow tier (end-to-end runs of minutes each), under 5 minutes
#   make demo   run the pipeline offline on the tiny model
# Keeping the locks (requirements-*.lock) fresh:
#   make lock            regenerate the locks whose requirements file changed (UPGRADE=1: newest versions allowed)
#   make upgrade-check   newest allowed versions in a scratch virtualenv + the fast tests; the locks stay as they are
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test check demo venv lock upgrade-check clean

# Reinstall only when the lock changed since the last install. The venv gets exactly the lock: every package at its
# locked version, every file's hash checked, anything the lock does not list removed.
$(STAMP): requirements-dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) scripts/lock.py --sync dev
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

# The fast lane: everything but the end-to-end runs of minutes each (tests/conftest.py lists them).
check: $(STAMP)
	$(PY) -m pytest -m "not slow"

# Train (with a SIGKILL and a resume), export, chat, then serve the Space; DEMO_NO_LAUNCH=1 skips serving.
demo: $(STAMP)
	$(PY) scripts/demo.py

lock: $(STAMP)
	$(PY) scripts/lock.py $(if $(UPGRADE),--upgrade)

upgrade-check: $(STAMP)
	$(PY) scripts/lock.py --upgrade-check

clean:
	rm -rf $(VENV) outputs
