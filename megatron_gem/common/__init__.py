"""Small engine-neutral helpers that every layer may import: atomic file writes and checkpoint
manifests (files.py, manifest.py). Nothing here imports another part of the project."""
