"""read_captions_jsonl keeps good lines and reports every bad one with its line number."""

from __future__ import annotations

import json

from cat_tokenizer.captions import read_captions_jsonl


def test_bad_lines_are_reported_and_good_lines_kept(tmp_path):
    path = tmp_path / "captions.jsonl"
    lines = [
        json.dumps({"image": "a.png", "caption": "a red apple", "domain": "photo"}).encode(),
        b"{not json",
        b"\xff\xfe bad bytes",
        json.dumps({"file_name": "b.png", "text": "  a chart  "}).encode(),
        json.dumps({"caption": "no image key"}).encode(),
        json.dumps(["a list"]).encode(),
        json.dumps({"image": "a.png", "caption": "again"}).encode(),
        b"",
        json.dumps({"image": "c.png", "caption": ""}).encode(),
        json.dumps({"image": "d.png"}).encode(),
        json.dumps({"image": "e.png", "caption": 5}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    parsed = read_captions_jsonl(path)

    assert [(e.image, e.caption, e.line) for e in parsed.entries] == [
        ("a.png", "a red apple", 1),
        ("b.png", "a chart", 4),
        ("c.png", None, 9),
        ("d.png", None, 10),
    ]
    assert parsed.entries[0].extra == {"domain": "photo"}
    reasons = {error.line: error.reason for error in parsed.errors}
    assert set(reasons) == {2, 3, 5, 6, 7, 11}
    assert "not valid JSON" in reasons[2]
    assert "not valid UTF-8" in reasons[3]
    assert "no image key" in reasons[5]
    assert "JSON object" in reasons[6]
    assert "duplicate entry for 'a.png'" in reasons[7] and "line 1" in reasons[7]
    assert "must be a string" in reasons[11]
    assert all(str(path) in str(error) for error in parsed.errors)


def test_devset_captions_parse_cleanly(devset_dir):
    parsed = read_captions_jsonl(devset_dir / "captions.jsonl")
    assert parsed.errors == []
    assert len(parsed.entries) == 346
    assert all((devset_dir / entry.image).is_file() for entry in parsed.entries)
