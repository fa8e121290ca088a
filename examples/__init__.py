"""Runnable examples of compact_compile on diffusers models."""
