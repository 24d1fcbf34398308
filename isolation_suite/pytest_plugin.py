"""pytest plug-in: filled in by the product-surfaces work."""
