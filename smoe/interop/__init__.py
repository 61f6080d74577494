"""Interoperability with Hugging Face: config.json mapping (and, as it lands, weights and export)."""
