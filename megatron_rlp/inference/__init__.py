"""Inference: checkpoint loading (`load.py`), cached decoding and sampling for RLP and `generate`."""
