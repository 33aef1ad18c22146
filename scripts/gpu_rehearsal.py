"""A fresh Python environment that holds only the device's package set (issue 23's rehearsal), made offline
from this machine's .venv in a second or two.

    python scripts/gpu_rehearsal.py DIR     # DIR/bin/python: the rehearsal's stand-in for the device's python3

``python -m venv --without-pip DIR``, then, in its site-packages, a symbolic link to every top-level file and
folder (RECORD) of each distribution of .venv that scripts/gpu_device_packages.txt lists (the device image's
packages), and nothing of the others: pycocotools, fvcore, iopath, yacs, termcolor, submitit, hotcoco,
panopticapi, torch-ms-deform-attn and the project itself (its editable install and entry points) stay out,
so that scripts/gpu_check.sh must bring them from the carried wheels. The versions are .venv's (Python 3.11
and its torch here; the device has 3.12 and torch 2.11): what is rehearsed is the set of names and the
offline install, not the versions. Prints what it left out.
"""
from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages(listing: Path = REPO / "scripts" / "gpu_device_packages.txt") -> set[str]:
    return {normal(line.strip()) for line in listing.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def distributions(site: Path) -> dict[str, tuple[Path, set[str]]]:
    """Normalised name -> (dist-info folder, the top-level names of its files) of each distribution in ``site``."""
    out = {}
    for info in sorted(site.glob("*.dist-info")):
        meta = info / "METADATA"
        if not meta.is_file():
            continue
        name = next((line.split(":", 1)[1].strip() for line in meta.read_text(errors="replace").splitlines()
                     if line.startswith("Name:")), None)
        if name is None:
            continue
        tops = {info.name}
        record = info / "RECORD"
        if record.is_file():
            for line in record.read_text(errors="replace").splitlines():
                path = line.split(",", 1)[0]
                if path and not path.startswith(("..", "/")):
                    tops.add(path.split("/", 1)[0])
        out[normal(name)] = (info, {t for t in tops if t != "__pycache__"})
    return out


def make(target: Path, source_site: Path | None = None) -> list[str]:
    """Create the environment in ``target`` (new folder); returns the distributions left out."""
    source_site = Path(source_site or sysconfig.get_paths()["purelib"])
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    site = Path(subprocess.run([str(target / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    wanted = device_packages()
    dists = distributions(source_site)
    kept = {n for n in dists if n in wanted}
    shared = set().union(*(dists[n][1] for n in kept)) if kept else set()
    left_out = sorted(set(dists) - kept)
    for n in left_out:  # a top-level folder that a left-out distribution shares with a kept one would leak it
        clash = dists[n][1] & shared
        if clash:
            raise SystemExit(f"gpu_rehearsal: {n} (not on the device) shares {sorted(clash)} with a device package")
    for top in sorted(shared):
        src = source_site / top
        if src.exists():
            (site / top).symlink_to(src)
    return left_out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    left_out = make(Path(argv[0]))
    print(f"gpu_rehearsal: {argv[0]}/bin/python without: {', '.join(left_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
