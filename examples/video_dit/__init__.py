"""A small video DiT trained from scratch on procedural clips (issue #6)."""
