"""The embedded worlds: the synthetic Visual-Genome-style world and the real-image world, and their command-line arguments."""
