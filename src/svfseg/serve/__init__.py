"""`svfseg serve`: a local web app that segments your own images from a few annotated supports."""
