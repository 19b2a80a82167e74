"""Pieces of the training loop (mimajax/train.py): model initialisation, metrics and samples."""
