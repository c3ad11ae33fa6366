"""Transform families, one module each; their public names are re-exported by funcopt."""
