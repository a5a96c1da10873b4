"""Image storage: blobs, layers, images."""
