"""Output files are readable as the umask says (atomic writes used to create 0600 files)."""

from __future__ import annotations


def test_atomic_writes_follow_the_umask(tmp_path) -> None:
    import os
    import stat

    from clipsam.io import atomic_write

    old = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o640  # group-readable, as the umask says
