"""Datasets and class-name lists."""
