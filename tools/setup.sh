#!/usr/bin/env bash
# Create .venv and install ld3m (editable) with the CPU build of torch. Idempotent.
# One resolver pass (setup.py pins torch==2.13.0, the CPU wheel); bytecode is compiled
# afterwards on every core instead of package by package inside pip.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check --no-compile -e ".[dev]"
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
# Skipped: the packages' own test suites and transformers' model zoo (a third of the bytes; ld3m
# imports none of it but HeLlO's CLIP, compiled on use). A few files inside packages are not
# valid for this Python (torch's py312 test helpers): compileall exits 1 for them.
.venv/bin/python -m compileall -q -j 0 -x '/tests?/|/transformers/models/' "$site" > /dev/null || true
