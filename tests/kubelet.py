"""The kubelet's way of updating a Secret or ConfigMap volume, step for step, for tests.

kubernetes/pkg/volume/util/atomic_writer.go, `AtomicWriter.Write`: (5) a new timestamped
folder `..YYYY_MM_DD_HH_MM_SS.<random>` (os.MkdirTemp, chmod 0755); (6) the payload written
into it with the volume's mode; (8) a symlink `..data_tmp` to it; (9) renamed over `..data`
(atomic); (10) the user-visible `name -> ..data/name` links created when missing (never
touched again); (12) the previous timestamped folder removed.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def project(volume: Path, files: dict[str, str], mode: int = 0o644) -> Path:
    """Write `files` into the volume as the kubelet does; returns the new timestamped folder."""
    volume.mkdir(parents=True, exist_ok=True)
    data = volume / "..data"
    old = os.readlink(data) if data.is_symlink() else ""
    ts = Path(tempfile.mkdtemp(dir=volume, prefix=time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())))
    ts.chmod(0o755)
    for name, text in files.items():
        (ts / name).write_text(text)
        (ts / name).chmod(mode)
    tmp = volume / "..data_tmp"
    os.symlink(ts.name, tmp)
    os.rename(tmp, data)
    for name in files:
        visible = volume / name
        if not visible.is_symlink():
            os.symlink(f"..data/{name}", visible)
    if old:
        for child in sorted((volume / old).rglob("*"), reverse=True):
            child.unlink() if not child.is_dir() else child.rmdir()
        (volume / old).rmdir()
    return ts
