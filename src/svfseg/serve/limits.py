"""What one request of `svfseg serve` may hold (imports nothing: `svfseg --help` reads the defaults)."""

MAX_SHOTS = 5
# 25 MP: a 24 MP camera photo passes; the 100 MP JPEG of issue 22 (29.6 s, 4 GB) is refused from its header.
DEFAULT_MAX_PIXELS = 25_000_000
DEFAULT_MAX_QUERIES = 16
# Steps of one adaptation to a request's supports (each is a forward and backward pass over them).
MAX_ADAPT_STEPS = 200
