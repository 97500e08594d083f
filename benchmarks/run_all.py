"""Run every benchmark in this folder (`make bench`), one subprocess each, JSON into bench_results/.

Extra arguments are passed to every benchmark (e.g. `--quick`, `--device cuda`).
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    out_dir = HERE.parent / "bench_results"
    out_dir.mkdir(exist_ok=True)
    failures = []
    for script in sorted(HERE.glob("bench_*.py")):
        json_path = out_dir / f"{script.stem}.json"
        print(f"\n=== {script.name} ===", flush=True)
        cmd = [sys.executable, str(script), "--json", str(json_path), *argv]
        if subprocess.call(cmd) != 0:
            failures.append(script.name)
    if failures:
        print(f"\nbenchmarks that failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"\nresults written to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
