"""Where images and captions come from: fine-tuning metadata (.json/.jsonl), --in_json, cache_info."""

from __future__ import annotations

import json
import os

import pytest

from library.dataset_config import load_dataset_configs
from library.datasets import build_dataset_groups
from library.errors import UserError
from tests.dataset_helpers import make_args, make_folder, write_toml


def _ft(tmp_path, meta_name: str, image_dir: bool = True, wildcard: bool = False):
    lines = [f'metadata_file = "{tmp_path / meta_name}"']
    if image_dir:
        lines.append(f'image_dir = "{tmp_path / "img"}"')
    if wildcard:
        lines.append("enable_wildcard = true")
    cfg = write_toml(tmp_path / "c.toml", "[[datasets]]\nresolution = 32\n[[datasets.subsets]]\n" + "\n".join(lines))
    return build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)[0]


def test_jsonl_metadata_with_sizes_and_tags(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (32, 32), "b.png": (48, 32)})
    with open(tmp_path / "m.jsonl", "w") as f:
        f.write(json.dumps({"image_path": "a.png", "caption": "a cat", "tags": "red, cute"}) + "\n\n")
        f.write(json.dumps({"image_path": str(tmp_path / "img" / "b.png"), "caption": "a dog",
                            "image_size": [48, 32]}) + "\n")
    g = _ft(tmp_path, "m.jsonl")
    got = {os.path.basename(e.path): (e.caption, e.size) for e in g.entries()}
    assert got == {"a.png": ("a cat,red, cute", (32, 32)), "b.png": ("a dog", (48, 32))}


def test_json_metadata_key_without_extension_and_wildcard_tags(tmp_path):
    make_folder(tmp_path / "img", {"a.jpg": (32, 32)})
    (tmp_path / "m.json").write_text(json.dumps({"a": {"caption": "one\ntwo", "tags": "t1"}}))
    (e,) = _ft(tmp_path, "m.json", wildcard=True).entries()
    assert e.path.endswith("a.jpg") and e.caption == "one,t1\ntwo,t1"


def test_json_metadata_key_without_extension_finds_an_upper_case_extension(tmp_path):
    # sd-scripts' older metadata files name images without extension; cameras write .JPG
    make_folder(tmp_path / "img", {"photo.JPG": (48, 32)})
    (tmp_path / "m.json").write_text(json.dumps({"photo": {"caption": "a photo"}}))
    (e,) = _ft(tmp_path, "m.json").entries()
    assert (e.path, e.caption, e.size) == (str(tmp_path / "img" / "photo.JPG"), "a photo", (48, 32))

@pytest.mark.parametrize("wildcard", [False, True])
def test_tags_without_caption_are_the_caption(tmp_path, wildcard):
    # tagger output with no caption: the tags stand in for it, with or without wildcards
    make_folder(tmp_path / "img", {"a.png": (32, 32), "b.png": (32, 32)})
    metadata = {"a.png": {"tags": "1girl, solo"}, "b.png": {"caption": "", "tags": "x"}}
    (tmp_path / "m.json").write_text(json.dumps(metadata))
    got = {os.path.basename(e.path): e.caption for e in _ft(tmp_path, "m.json", wildcard=wildcard).entries()}
    assert got == {"a.png": "1girl, solo", "b.png": "x"}


def test_metadata_image_size_yields_to_the_exif_rotated_header(tmp_path):
    # sd-scripts' tools record the stored size; the image trains upright, so its bucket follows that
    from PIL import Image

    (tmp_path / "img").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.new("RGB", (64, 32)).save(tmp_path / "img" / "r.jpg", exif=exif.tobytes())
    (tmp_path / "m.json").write_text(json.dumps({"r.jpg": {"caption": "x", "image_size": [64, 32]}}))
    (e,) = _ft(tmp_path, "m.json").entries()
    assert e.size == (32, 64)  # (W, H) upright: the bucket is chosen from this


def test_relative_key_without_image_dir_is_an_error(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"a.png": {"caption": "x"}}))
    with pytest.raises(UserError, match=r"m\.json: image key 'a\.png' is a relative path and not found from the "
                                        r"working folder .*; set image_dir in datasets\[0\]\.subsets\[0\]"):
        _ft(tmp_path, "m.json", image_dir=False)


def test_relative_keys_are_found_in_image_dir_then_from_the_working_folder(tmp_path, monkeypatch):
    # sd-scripts' merge_captions_to_metadata.py --full_path writes keys relative to where it ran
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "img", {"a.png": (32, 32), "b.png": (32, 32)})
    make_folder(tmp_path, {"b.png": (48, 48)})  # another b.png in the working folder: image_dir's wins
    (tmp_path / "m.json").write_text(json.dumps({"img/a.png": {"caption": "x"}, "b.png": {"caption": "y"}}))
    for image_dir in (True, False):
        entries = _ft(tmp_path, "m.json", image_dir).entries()
        got = {e.caption: (os.path.relpath(e.path, tmp_path), e.size) for e in entries}
        b = ("img/b.png", (32, 32)) if image_dir else ("b.png", (48, 48))
        assert got == {"x": ("img/a.png", (32, 32)), "y": b}


def test_missing_metadata_image_is_named(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (32, 32)})
    (tmp_path / "m.json").write_text(json.dumps({"zz.png": {"caption": "x"}}))
    with pytest.raises(UserError, match=r"m\.json: image 'zz\.png' not found"):
        _ft(tmp_path, "m.json")


def test_missing_and_malformed_metadata_files(tmp_path):
    with pytest.raises(UserError, match=r"c\.toml: datasets\[0\]\.subsets\[0\]\.metadata_file: .*nope\.json' not"):
        _ft(tmp_path, "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match=r"bad\.json: not valid JSON"):
        _ft(tmp_path, "bad.json")
    make_folder(tmp_path / "img", {"a.png": (32, 32)})
    good = json.dumps({"image_path": "a.png", "caption": "a cat"})
    (tmp_path / "bad.jsonl").write_text(f"{good}\n\n{good}\n{{broken\n")
    with pytest.raises(UserError, match=r"bad\.jsonl: line 4 is not valid JSON"):  # the file's line, not 1
        _ft(tmp_path, "bad.jsonl")
    (tmp_path / "strings.json").write_text(json.dumps({"a.png": "a photo of a cat"}))
    with pytest.raises(UserError, match=r"strings\.json: entry 'a\.png' is str, not an object"):
        _ft(tmp_path, "strings.json")
    (tmp_path / "lists.json").write_text(json.dumps({"a.png": {"caption": ["a", "cat"]}}))
    with pytest.raises(UserError, match=r"lists\.json: entry 'a\.png': caption is list, not text"):
        _ft(tmp_path, "lists.json")


def test_json_metadata_that_is_not_an_object_at_the_top_level(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (32, 32)})
    (tmp_path / "list.json").write_text(json.dumps([{"a.png": {"caption": "x"}}]))
    with pytest.raises(UserError) as ei:
        _ft(tmp_path, "list.json")
    expected = '{"image key": {"caption": ...}}'
    assert str(ei.value) == f"{tmp_path / 'list.json'}: expected an object {expected} at the top level."


def test_jsonl_naming_an_image_twice_warns_and_the_later_line_wins(tmp_path, caplog):
    make_folder(tmp_path / "img", {"a.png": (32, 32)})
    lines = [json.dumps({"image_path": "a.png", "caption": caption}) for caption in ("first", "second")]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        assert [e.caption for e in _ft(tmp_path, "m.jsonl").entries()] == ["second"]
    assert f"{tmp_path / 'm.jsonl'}: line 2 names 'a.png' again; the later line is used" in caplog.text

def test_metadata_file_not_in_utf8_and_an_upper_case_jsonl(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (32, 32)})
    text = json.dumps({"a.png": {"caption": "猫"}}, ensure_ascii=False)
    (tmp_path / "sjis.json").write_bytes(text.encode("shift_jis"))
    with pytest.raises(UserError, match=r"sjis\.json: metadata file is not valid UTF-8 \(.* at byte 23\); re-save it"):
        _ft(tmp_path, "sjis.json")
    line = json.dumps({"image_path": "a.png", "caption": "a cat"})
    (tmp_path / "M.JSONL").write_text(f"{line}\r\n{line}\r\n")  # lines, as .jsonl (two entries for one image)
    assert [e.caption for e in _ft(tmp_path, "M.JSONL").entries()] == ["a cat"]


def test_in_json_without_toml_builds_a_finetuning_dataset(tmp_path):
    make_folder(tmp_path / "img", {"a.png": (32, 32)})
    (tmp_path / "m.json").write_text(json.dumps({"a.png": {"caption": "hello"}}))
    args = make_args("--in_json", str(tmp_path / "m.json"), "--train_data_dir", str(tmp_path / "img"),
                     "--resolution", "32", "--dataset_repeats", "3")
    (d,) = load_dataset_configs(args)
    assert d.kind == "finetune" and d.subsets[0].num_repeats == 3
    g, _ = build_dataset_groups([d], seed=0)
    assert [(e.caption, e.num_repeats) for e in g.entries()] == [("hello", 3)]


def test_reg_data_dir_beside_in_json_is_named_as_ignored(tmp_path, caplog):
    make_folder(tmp_path / "img", {"a.png": (32, 32)})
    (tmp_path / "m.json").write_text(json.dumps({"a.png": {"caption": "hello"}}))
    args = make_args("--in_json", str(tmp_path / "m.json"), "--train_data_dir", str(tmp_path / "img"),
                     "--reg_data_dir", str(tmp_path / "reg"), "--resolution", "32")  # fmt: skip
    with caplog.at_level("WARNING"):
        (d,) = load_dataset_configs(args)
    assert not any(s.is_reg for s in d.subsets)
    assert "--reg_data_dir" in caplog.text and "is ignored with --in_json" in caplog.text


def _cache_info_group(tmp_path, folder):
    cfg = write_toml(tmp_path / "c.toml", f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\n'
                                          f'image_dir = "{folder}"\ncaption_extension = ".txt"\n'
                                          "cache_info = true\n")  # fmt: skip
    g, _ = build_dataset_groups(load_dataset_configs(make_args("--dataset_config", cfg)), seed=0)
    return sorted((os.path.basename(e.path), e.caption, e.size) for e in g.entries())


def test_cache_info_keeps_sizes_but_reads_the_folder_and_captions_each_run(tmp_path, monkeypatch):
    import library.dataset_sources as sources

    folder = tmp_path / "img"
    make_folder(folder, {"a.png": (40, 32), "b.png": (32, 48)}, {"a.png": "from file", "b.png": "bee"})
    assert _cache_info_group(tmp_path, folder) == [("a.png", "from file", (40, 32)), ("b.png", "bee", (32, 48))]
    info = json.loads((folder / "metadata_cache.json").read_text())
    a = info[str(folder / "a.png")]
    assert (a["caption"], a["resolution"], a["bytes"]) == ("from file", [40, 32], os.path.getsize(folder / "a.png"))

    measured = []
    real_size = sources.read_image_size
    monkeypatch.setattr(sources, "read_image_size", lambda p: measured.append(os.path.basename(p)) or real_size(p))
    (folder / "a.txt").write_text("edited")  # an edited caption is read; the sizes come from the file
    assert _cache_info_group(tmp_path, folder) == [("a.png", "edited", (40, 32)), ("b.png", "bee", (32, 48))]
    assert measured == []
    assert json.loads((folder / "metadata_cache.json").read_text())[str(folder / "a.png")]["caption"] == "edited"

    moved = tmp_path / "moved"  # the folder moves: its entries still count
    os.rename(folder, moved)
    make_folder(moved, {"c.png": (48, 32)}, {"c.png": "new"})  # and a new image is found and measured
    assert _cache_info_group(tmp_path, moved)[-1] == ("c.png", "new", (48, 32))
    assert measured == ["c.png"]

    make_folder(moved, {"b.png": (64, 32)}, {"b.png": "bee"})  # a replaced image is measured again
    os.utime(moved / "b.png", ns=(1, 1))
    assert ("b.png", "bee", (64, 32)) in _cache_info_group(tmp_path, moved)
    assert measured == ["c.png", "b.png"]


def test_cache_info_from_sd_scripts_is_measured_once_and_rewritten(tmp_path):
    folder = tmp_path / "img"
    make_folder(folder, {"a.png": (40, 32)}, {"a.png": "cap"})
    # sd-scripts' layout: no byte count or mtime (and sizes before EXIF orientation): not trusted
    (folder / "metadata_cache.json").write_text(json.dumps({"img/a.png": {"caption": "old", "resolution": [1, 1]}}))
    assert _cache_info_group(tmp_path, folder) == [("a.png", "cap", (40, 32))]
    entry = json.loads((folder / "metadata_cache.json").read_text())[str(folder / "a.png")]
    assert entry["resolution"] == [40, 32] and "mtime" in entry


def test_cache_info_with_an_edited_size_is_measured_again(tmp_path):
    folder = tmp_path / "img"
    make_folder(folder, {"a.png": (40, 32)}, {"a.png": "cap"})
    _cache_info_group(tmp_path, folder)
    info = json.loads((folder / "metadata_cache.json").read_text())
    for bad in (["40", 32], [40.0, 32], [0, 32]):  # the byte count and mtime still match
        next(iter(info.values()))["resolution"] = bad
        (folder / "metadata_cache.json").write_text(json.dumps(info))
        assert _cache_info_group(tmp_path, folder) == [("a.png", "cap", (40, 32))]


def test_cache_info_with_an_image_rewritten_to_the_same_byte_count_is_measured_again(tmp_path, monkeypatch):
    # an editor that only flips the EXIF orientation tag keeps the byte count: the mtime tells the change
    from PIL import Image

    import library.dataset_sources as sources

    folder = tmp_path / "img"
    make_folder(folder, {}, {"r.jpg": "cap"})

    def save(orientation):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.new("RGB", (64, 32)).save(folder / "r.jpg", exif=exif.tobytes())

    save(1)
    assert _cache_info_group(tmp_path, folder) == [("r.jpg", "cap", (64, 32))]
    size_before = os.path.getsize(folder / "r.jpg")
    measured = []
    real_size = sources.read_image_size
    monkeypatch.setattr(sources, "read_image_size", lambda p: measured.append(os.path.basename(p)) or real_size(p))
    save(6)  # shown rotated by 90 degrees
    os.utime(folder / "r.jpg", ns=(1, 1))
    assert os.path.getsize(folder / "r.jpg") == size_before
    assert _cache_info_group(tmp_path, folder) == [("r.jpg", "cap", (32, 64))]
    assert measured == ["r.jpg"]
    entry = json.loads((folder / "metadata_cache.json").read_text())[str(folder / "r.jpg")]
    assert (entry["resolution"], entry["mtime"]) == ([32, 64], 1)


def test_cache_info_drops_a_deleted_image_from_the_file(tmp_path):
    folder = tmp_path / "img"
    make_folder(folder, {"a.png": (40, 32), "b.png": (32, 48)}, {"a.png": "ay", "b.png": "bee"})
    _cache_info_group(tmp_path, folder)
    cached = sorted(json.loads((folder / "metadata_cache.json").read_text()))
    assert cached == [str(folder / "a.png"), str(folder / "b.png")]
    os.remove(folder / "b.png")
    os.remove(folder / "b.txt")
    assert _cache_info_group(tmp_path, folder) == [("a.png", "ay", (40, 32))]
    assert list(json.loads((folder / "metadata_cache.json").read_text())) == [str(folder / "a.png")]


def test_cache_info_file_that_is_not_an_object_is_unreadable_and_rewritten(tmp_path, caplog):
    folder = tmp_path / "img"
    make_folder(folder, {"a.png": (40, 32)}, {"a.png": "cap"})
    (folder / "metadata_cache.json").write_text("[]")
    with caplog.at_level("WARNING"):
        assert _cache_info_group(tmp_path, folder) == [("a.png", "cap", (40, 32))]
    assert f"{folder / 'metadata_cache.json'}: unreadable (" in caplog.text
    assert "the images are measured again and the file rewritten" in caplog.text
    info = json.loads((folder / "metadata_cache.json").read_text())
    assert info[str(folder / "a.png")]["resolution"] == [40, 32]

def test_cache_info_that_cannot_be_written_warns_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "img"
    make_folder(folder, {"a.png": (40, 32)}, {"a.png": "cap"})
    renamed = []

    def refuse(src, dst):  # a read-only folder, or a disk that is full
        renamed.append(os.path.basename(src))
        raise PermissionError(13, "Permission denied", dst)

    monkeypatch.setattr(os, "replace", refuse)
    with caplog.at_level("WARNING"):
        assert _cache_info_group(tmp_path, folder) == [("a.png", "cap", (40, 32))]
    assert "--cache_info: cannot write" in caplog.text and "metadata_cache.json" in caplog.text
    # each process writes its own temporary file (several processes list one folder at once)
    assert renamed == [f"metadata_cache.json.{os.getpid()}.tmp"]
    assert sorted(os.listdir(folder)) == ["a.png", "a.txt"]


# ---- read straight from the subset (a mutation round found these unpinned) -------------------------


def _subset(tmp_path, **kw):
    from library.captions import CaptionOptions
    from library.dataset_config import SubsetConfig

    caption = CaptionOptions(**{k: kw.pop(k) for k in list(kw) if k in CaptionOptions.__dataclass_fields__})
    return SubsetConfig("datasets[0].subsets[0]", kw.pop("kind", "dreambooth"), str(tmp_path / "img"),
                        caption=caption, **kw)  # fmt: skip


def _metadata_subset(tmp_path, name, content, **kw):
    make_folder(tmp_path / "img", {"a.png": (32, 32)})
    (tmp_path / name).write_text(content)
    return _subset(tmp_path, kind="finetune", metadata_file=str(tmp_path / name), **kw)


def test_a_wildcard_caption_file_keeps_every_line(tmp_path):
    from library.dataset_sources import scan_subset

    make_folder(tmp_path / "img", {"a.png": (32, 32)}, {"a.png": "red\nblue\n"})
    (record,) = scan_subset(_subset(tmp_path, caption_extension=".txt", enable_wildcard=True))
    assert record.caption == "red\nblue"


@pytest.mark.parametrize("content, kw, caption", [
    ('{"a.png": {"caption": "x\\ny", "tags": "t1\\nt2"}}', {"enable_wildcard": True}, "x,t1,t2\ny,t1,t2"),
    ('{"a.png": {"caption": "x", "tags": "t"}}', {"caption_separator": ";"}, "x;t"),
])  # fmt: skip
def test_metadata_tags_join_each_wildcard_line_with_the_caption_separator(tmp_path, content, kw, caption):
    from library.dataset_sources import scan_subset

    (record,) = scan_subset(_metadata_subset(tmp_path, "m.json", content, **kw))
    assert record.caption == caption


@pytest.mark.parametrize("name, content, message", [
    ("m.jsonl", '{"caption": "x"}\n', 'line 1 has no "image_path"'),
    ("m.json", "{}", "holds no images"),
])  # fmt: skip
def test_metadata_without_images_is_one_message(tmp_path, name, content, message):
    from library.dataset_sources import scan_subset

    with pytest.raises(UserError, match=message):
        scan_subset(_metadata_subset(tmp_path, name, content))


def test_cache_info_measures_an_image_whose_byte_count_changed_under_the_same_mtime(tmp_path):
    from library.dataset_sources import scan_subset
    from tests.dataset_helpers import make_image

    make_folder(tmp_path / "img", {"a.png": (32, 32)})
    subset = _subset(tmp_path, cache_info=True)
    scan_subset(subset)
    path = str(tmp_path / "img" / "a.png")
    before = os.stat(path)
    make_image(path, (48, 32))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size != before.st_size
    (record,) = scan_subset(subset)
    assert record.size == (48, 32)


def test_cache_info_of_an_unchanged_folder_is_not_rewritten(tmp_path, monkeypatch):
    import library.dataset_sources as sources

    make_folder(tmp_path / "img", {"a.png": (32, 32)})
    subset = _subset(tmp_path, cache_info=True)
    sources.scan_subset(subset)
    replaced = []
    monkeypatch.setattr(sources.os, "replace", lambda *a: replaced.append(a))
    sources.scan_subset(subset)
    assert replaced == []
