"""Queries against a trained run, their pictures, and online importance (Ω from the queries' inputs)."""
