"""Heimdall training pipeline: transmitter localization from WebSDR receivers."""

__version__ = "0.1.0"
