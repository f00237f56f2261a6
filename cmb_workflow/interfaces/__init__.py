"""Nipype interfaces: one image-processing step each, with input and output specs."""
