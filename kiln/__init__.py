"""Kiln: a self-hosted inference server for generative media."""

__version__ = "0.1.0"
