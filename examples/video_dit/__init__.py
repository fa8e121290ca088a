"""Small video DiTs trained from scratch on procedural clips: short (4096 tokens, issue #6) and long
(16,384 tokens, issue #16)."""
