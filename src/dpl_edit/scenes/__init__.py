"""Synthetic scenes with exact ground truth, the scene model's training pipeline, and its checks."""
