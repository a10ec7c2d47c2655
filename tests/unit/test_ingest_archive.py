"""Safe zip extraction: hostile archives are refused and nothing lands outside work_dir."""
from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest

from app.ingest import IngestError, IngestLimits, ingest
from app.ingest.archive import extract_zip
from tests.fixtures.ingest_files import bomb_zip, lying_zip, make_zip, png_bytes, symlink_zip


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture
def sandbox(tmp_path):
    """work_dir nested two levels down, so an escape to its parent or grandparent is visible."""
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    return tmp_path, work


def refused(sandbox, zip_path: Path, code: str, limits=None) -> IngestError:
    root, work = sandbox
    before = tree(root)
    with pytest.raises(IngestError) as err:
        ingest("images", str(zip_path), zip_path.name, str(work), {}, limits)
    assert err.value.code == code, err.value
    # nothing new anywhere: no escaped file, no leftovers in work_dir
    assert tree(root) == before
    return err.value


def test_extracts_plain_archive(tmp_path):
    z = make_zip(tmp_path / "ok.zip", {"a/x.png": b"1", "b/sub/y.png": b"22"})
    files = extract_zip(str(z), str(tmp_path / "out"))
    assert sorted((f.name, f.size) for f in files) == [("a/x.png", 1), ("b/sub/y.png", 2)]
    assert (tmp_path / "out" / "b" / "sub" / "y.png").read_bytes() == b"22"


def test_parent_dir_entry_refused(sandbox):
    root, _ = sandbox
    z = make_zip(root / "evil.zip", {"cls_a/ok.png": png_bytes(), "../evil.png": b"x", "cls_b/ok.png": png_bytes()})
    err = refused(sandbox, z, "unsafe_archive")
    # entries are named by position, never by name (names often carry a patient's name)
    assert "'..'" in err.message and "entry 2" in err.message and "evil" not in err.message
    assert err.details == {"entry": 2}
    assert not (root / "a" / "evil.png").exists()


def test_nested_parent_dir_and_backslash_refused(sandbox):
    root, _ = sandbox
    refused(sandbox, make_zip(root / "e1.zip", {"cls_a/../../../evil.png": b"x"}), "unsafe_archive")
    refused(sandbox, make_zip(root / "e2.zip", {"cls_a\\..\\..\\evil.png": b"x"}), "unsafe_archive")


def test_absolute_path_refused(sandbox):
    root, _ = sandbox
    target = root / "abs_target.png"
    z = root / "abs.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("cls_a/ok.png", png_bytes())
        info = zipfile.ZipInfo("cls_b/x.png")
        info.filename = str(target)  # zipfile strips a leading '/' from names given to ZipInfo()
        zf.writestr(info, b"x")
    err = refused(sandbox, z, "unsafe_archive")
    assert "absolute path" in err.message
    assert not target.exists()
    refused(sandbox, make_zip(root / "drive.zip", {"C:/windows/x.png": b"x"}), "unsafe_archive")


def test_symlink_refused(sandbox):
    root, _ = sandbox
    err = refused(sandbox, symlink_zip(root / "link.zip"), "unsafe_archive")
    assert "symbolic link" in err.message


def test_duplicate_names_refused(sandbox):
    root, _ = sandbox
    z = root / "dup.zip"
    with zipfile.ZipFile(z, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("cls_a/x.png", png_bytes())
        zf.writestr("cls_a/x.png", png_bytes(seed=1))
    assert "entries 1 and 2 have the same name" in refused(sandbox, z, "unsafe_archive").message
    z2 = make_zip(root / "clash.zip", {"cls_a": b"file", "cls_a/x.png": png_bytes()})
    assert "both a file and a folder" in refused(sandbox, z2, "unsafe_archive").message


def test_too_many_members_refused(sandbox):
    root, _ = sandbox
    z = make_zip(root / "many.zip", {f"c{i % 2}/{i}.png": b"x" for i in range(30)})
    err = refused(sandbox, z, "too_many_members", IngestLimits(max_members=10))
    assert err.http_status == 413


def test_zip_bomb_over_size_cap_refused(sandbox):
    root, _ = sandbox
    z = bomb_zip(root / "bomb.zip", 24 << 20)
    assert z.stat().st_size < 200_000
    err = refused(sandbox, z, "archive_too_large", IngestLimits(max_bytes=8 << 20))
    assert err.http_status == 413


def test_zip_bomb_ratio_refused(sandbox):
    root, _ = sandbox
    err = refused(sandbox, bomb_zip(root / "bomb.zip", 24 << 20), "zip_bomb")
    assert "fold" in err.message and err.http_status == 422


def test_lying_headers_caught_while_extracting(sandbox):
    # the headers say 1000 bytes; the member really inflates to 4 MiB
    root, _ = sandbox
    z = lying_zip(root / "liar.zip", real_bytes=4 << 20, declared_bytes=1000)
    with zipfile.ZipFile(z) as zf:
        assert zf.getinfo("cls_a/big.png").file_size == 1000
    refused(sandbox, z, "corrupt_archive")


def test_encrypted_member_refused(sandbox):
    root, _ = sandbox
    z = make_zip(root / "enc.zip", {"cls_a/x.png": b"x", "cls_b/y.png": b"y"}, zipfile.ZIP_STORED)
    data = bytearray(z.read_bytes())
    # set the "encrypted" general-purpose flag in the local header and central directory
    data[6] |= 0x1
    cd = data.find(b"PK\x01\x02")
    data[cd + 8] |= 0x1
    z.write_bytes(bytes(data))
    refused(sandbox, z, "encrypted_archive")


def test_not_a_zip(sandbox):
    root, _ = sandbox
    p = root / "x.zip"
    p.write_bytes(b"this is not a zip")
    refused(sandbox, p, "invalid_archive")


def test_extraction_never_follows_existing_links(tmp_path):
    # even if something planted a link inside the destination, O_EXCL|O_NOFOLLOW refuses to write through it
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    os.symlink(tmp_path / "victim", out / "a" / "x.png")
    z = make_zip(tmp_path / "ok.zip", {"a/x.png": b"payload"})
    with pytest.raises(IngestError):
        extract_zip(str(z), str(out))
    assert not (tmp_path / "victim").exists()
    assert stat.S_ISLNK(os.lstat(out / "a" / "x.png").st_mode)


def test_flat_extraction_and_rewrite_keep_names_and_originals_off_disk(tmp_path):
    from app.ingest.archive import MemberRejected

    z = make_zip(tmp_path / "ok.zip", {"DOE_JANE/a.png": b"1", "DOE_JANE/b.dcm": b"secret", "DOE_JANE/c.dcm": b"bad"})

    def rewrite(name, head, size):
        if not name.endswith(".dcm"):
            return None
        if head == b"bad":
            raise MemberRejected("cannot be de-identified")
        return lambda raw: raw.replace(b"secret", b"------")

    files = extract_zip(str(z), str(tmp_path / "out"), flat=True, rewrite=rewrite)
    assert [(f.name, f.position, f.rewritten, f.rejected) for f in files] == [
        ("DOE_JANE/a.png", 1, False, None), ("DOE_JANE/b.dcm", 2, True, None),
        ("DOE_JANE/c.dcm", 3, True, "cannot be de-identified")]
    assert tree(tmp_path / "out") == {"0000001", "0000002"}  # no archive name reaches the disk
    assert (tmp_path / "out" / "0000002").read_bytes() == b"------"
