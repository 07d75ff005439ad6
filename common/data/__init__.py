"""Data stage: the case manifest, dataset download and extraction, offline synthetic phantoms."""
