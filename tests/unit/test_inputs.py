"""Annotation files a user gets wrong are reported with file, line and column (trainers.core.inputs)."""

from __future__ import annotations

import pytest

from trainers.core.inputs import DataError, read_json


def test_a_json_file_cut_short_names_the_line_and_column(tmp_path):
    path = tmp_path / "anno.json"
    path.write_text('[\n  {"video": "a.mp4", "caption": "a dog"},\n  {"video": "b.mp4", "capt')
    with pytest.raises(
        DataError, match=rf"^{path}:3:22: not valid JSON \(Unterminated string .*\); expected a list$"
    ):
        read_json(path, "a list")


def test_a_file_that_is_not_utf8_text_says_so(tmp_path):
    path = tmp_path / "anno.json"
    path.write_bytes(b'[{"video": "\xff\xfe\xfa"}]')
    with pytest.raises(DataError, match=rf"^{path}: not UTF-8 text"):
        read_json(path, "a list")


def test_alpro_reads_jsonl_and_names_the_bad_line(tmp_path):
    from trainers.alpro.data import read_annotations

    path = tmp_path / "anno.jsonl"
    path.write_text('{"video": "a.mp4", "caption": "x"}\n{"video": "b.mp4", "caption": "y"}\n')
    assert [e["video"] for e in read_annotations(path)] == ["a.mp4", "b.mp4"]
    path.write_text('{"video": "a.mp4", "caption": "x"}\n{"video": "b.mp4" "caption": "y"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2:19: not valid JSON \(Expecting ',' delimiter\)"):
        read_annotations(path)


def test_singularity_says_what_an_annotation_list_must_hold(tmp_path):
    from trainers.singularity.data import load_anno

    (tmp_path / "videos").mkdir()
    path = tmp_path / "anno.json"
    path.write_text('[{"caption": "no video key"}]')
    with pytest.raises(DataError, match=rf"^{path}: expected a JSON list of objects with a 'video' key"):
        load_anno(path, tmp_path / "videos")
