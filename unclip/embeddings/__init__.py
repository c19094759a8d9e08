"""CLIP embedding files, their interop formats, PCA and embedding-space filters."""
