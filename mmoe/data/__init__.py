"""WebDataset shards: writers, manifest, reader with exact resume."""
