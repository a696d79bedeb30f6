"""Image-classification datasets for the recognition sequence: sources, IDX files, the image HDF5."""
