"""Attention pieces: decode attention where the pages are, prefill attention, page selection."""
