"""Readers of the relation datasets: raw Visual Genome (streamed JSON), VG-SGG.h5, the lifelong-fact-learning files."""
