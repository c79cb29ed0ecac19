"""Images in and out of the gateway: decoding and encoding (codec), error heatmaps (heatmap), L1 error maps and
their statistics (error_maps)."""
