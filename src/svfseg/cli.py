"""Command-line entry point: `svfseg demo|prepare|train|test|predict|report|merge`."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("svfseg: the command line is not yet available (see README).")
    return 0
