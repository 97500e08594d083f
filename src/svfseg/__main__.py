"""`python -m svfseg ...` (also what `torchrun -m svfseg train ...` runs)."""
from svfseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
