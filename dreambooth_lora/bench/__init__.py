"""Measurement engines that use the tiny world: the quality bench (quality.py) and the base-model trainer (base_model.py)."""
