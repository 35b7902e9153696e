"""napari dock widgets (Qt only; they call the core and never compute themselves)."""
