"""Models: spec -> module tree, the torch layers, the ModelTree and its interception, user factories."""
