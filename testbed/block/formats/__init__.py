"""Image format drivers of the block-layer model, one module per format."""
