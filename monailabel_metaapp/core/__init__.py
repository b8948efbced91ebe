"""Meta-learning core in plain PyTorch: no MONAI Label imports, so it runs on any machine with torch."""
