#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11): mimajax with the data stack, the PyTorch references and the test tools,
# plus mediapipe 0.10.21 for the face-landmark models it bundles (offline motion extraction).
# mediapipe goes in with --no-deps: its metadata pins protobuf<5 and numpy<2, which tensorflow 2.21 and
# jax 0.10 cannot share; mimajax never imports it, it reads the .tflite files and runs them with LiteRT.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -e ".[dev]"
python3 -m pip install -q --no-deps "mediapipe==0.10.21"
