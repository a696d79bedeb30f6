"""The fact file: what a reader collects, the shared pipeline and its options, splits, region crops, the writer and strict reader."""
