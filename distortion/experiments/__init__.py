"""Everything that touches torch, data and files: extraction, hypothesis tests, measurement."""
