"""Conversion into shards: bad-input policy, counts, strict mode, determinism across workers."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssd.data.convert import ConversionError, convert, format_summary
from ssd.data.records import Problem, Record, SampleError
from ssd.data.shards import ShardSet, file_sha256, read_samples


@dataclass
class ListReader:
    """The reader protocol over records built in the test (what VocReader/CocoReader provide)."""

    records: list
    classes: tuple = ("cat", "dog")
    id_mapping: dict = field(default_factory=lambda: {"cat": 1, "dog": 2})
    listing_problems: list = field(default_factory=list)

    def tasks(self):
        return list(range(len(self.records)))

    def read(self, task):
        item = self.records[task]
        if isinstance(item, Problem):
            raise SampleError(item)
        record, problems = item
        return replace(record, boxes=[list(b) for b in record.boxes]), list(problems)

    def describe(self):
        return {"type": "test"}


def _save(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode).save(path, quality=90)
    return path


def _record(path: Path, key: str, width: int = 32, height: int = 24, boxes=((2, 3, 10, 12),), labels=(1,)) -> Record:
    n = len(labels)
    return Record(key=key, image_path=str(path), image_id=int(key[1:]), width=width, height=height,
                  boxes=[list(map(float, b)) for b in boxes], labels=list(labels), difficult=[False] * n,
                  truncated=[False] * n, iscrowd=[False] * n, source=f"test:{key}",
                  annotation_file=f"ann/{key}.xml")


@pytest.fixture
def messy(tmp_path):
    """Six good samples and one of every bad-input case."""
    img = tmp_path / "img"
    img.mkdir()
    records = [(_record(_save(img / f"g{i}.jpg", 32, 24, seed=i), f"g{i}"), []) for i in range(4)]
    records.append((_record(_save(img / "g4.jpg", 32, 24, mode="L"), "g4"), []))  # grayscale: re-encoded
    records.append((_record(_save(img / "g5.jpg", 32, 24, seed=5), "g5", boxes=((-4, 2, 40, 20), (5, 5, 5, 9), (1, 1, 4, 4)), labels=(1, 2, 2)), [
        Problem("unknown_class", "ann/g5.xml", "object 3: class 'cow' is not in the class list")]))
    records.append((_record(img / "missing.jpg", "b1"), []))
    (img / "corrupt.jpg").write_bytes(_save(img / "tmp.jpg", 32, 24).read_bytes()[:300])
    records.append((_record(img / "corrupt.jpg", "b2"), []))
    records.append((_record(_save(img / "b3.jpg", 20, 24), "b3"), []))  # annotation says 32 wide
    records.append(Problem("malformed_annotation", "ann/b4.xml", "no <size> element"))
    reader = ListReader(records, listing_problems=[Problem("duplicate_image", "sets/train.txt", "id g0 listed twice")])
    return reader


def test_bad_input_is_counted_and_named_and_good_samples_are_all_kept(messy, tmp_path):
    lines: list[str] = []
    report = convert(messy, tmp_path / "out", shard_size=4, workers=1, progress=False, log=lines.append)
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert report.written == info["num_samples"] == 6 and report.listed == 10
    # every valid object kept: 1 each for g0..g4, and 2 of g5's 3 (one clipped, one degenerate dropped)
    assert info["num_objects"] == 7 and info["objects_per_class"] == {"cat": 6, "dog": 1}
    assert info["problems"] == {
        "missing_image": 1, "corrupt_image": 1, "malformed_annotation": 1, "size_mismatch": 1,
        "duplicate_image": 1, "unknown_class": 1, "degenerate_box": 1, "box_clipped": 1,
    }
    assert info["num_reencoded"] == 1 and report.reencoded == {"grayscale JPEG": 1}
    text = "\n".join(lines)
    for expected in (
        "missing.jpg: image file not found (annotated in ann/b1.xml)",
        "corrupt.jpg: cannot decode image",
        "ann/b3.xml: the annotation says 32x24 but the image",
        "ann/b4.xml: no <size> element",
        "ann/g5.xml: object with label 1: box [-4, 2, 40, 20] reaches outside the 32x24 image; clipped to [0, 2, 32, 20]",
        "ann/g5.xml: object with label 2: box [5, 5, 5, 9] has no area",
        "class 'cow' is not in the class list",
    ):
        assert expected in text
    assert (tmp_path / "out" / "problems.txt").read_text().count("\n") == 8

    samples = {key: meta for key, _, meta in read_samples(ShardSet.open(tmp_path / "out"))}
    assert sorted(samples) == [f"g{i}" for i in range(6)]
    assert samples["g5"]["boxes"] == [[0.0, 2.0, 32.0, 20.0], [1.0, 1.0, 4.0, 4.0]]
    assert samples["g5"]["labels"] == [1, 2]
    assert samples["g0"] == {"boxes": [[2.0, 3.0, 10.0, 12.0]], "labels": [1], "difficult": [False],
                             "truncated": [False], "iscrowd": [False], "width": 32, "height": 24,
                             "image_id": 0, "source": "test:g0"}

    summary = format_summary(report)
    assert "6 written of 10 listed" in summary and "1 re-encoded (1 grayscale JPEG)" in summary
    assert any(line.startswith("box_clipped") and line.split()[3] == "1" for line in summary.splitlines())


def test_original_jpeg_bytes_are_kept(messy, tmp_path):
    convert(messy, tmp_path / "out", workers=1, progress=False, log=lambda _: None)
    jpgs = {key: jpg for key, jpg, _ in read_samples(ShardSet.open(tmp_path / "out"))}
    assert jpgs["g0"] == (tmp_path / "img" / "g0.jpg").read_bytes()
    assert jpgs["g4"] != (tmp_path / "img" / "g4.jpg").read_bytes()
    assert Image.open(io.BytesIO(jpgs["g4"])).mode == "RGB"


def test_strict_mode_stops_at_the_first_problem_and_leaves_nothing(messy, tmp_path):
    with pytest.raises(ConversionError, match="strict mode: sets/train.txt: id g0 listed twice"):
        convert(messy, tmp_path / "out", workers=1, strict=True, progress=False)
    messy.listing_problems.clear()
    with pytest.raises(ConversionError, match=r"ann/g5.xml: object 3: class 'cow'"):
        convert(messy, tmp_path / "out", workers=1, strict=True, progress=False, shard_size=2, overwrite=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_same_bytes_whatever_the_number_of_workers(messy, tmp_path):
    quiet = {"progress": False, "log": lambda _: None, "shard_size": 4}
    one = convert(messy, tmp_path / "one", workers=1, **quiet).info
    two = convert(messy, tmp_path / "two", workers=2, **quiet).info
    assert one == two and len(one["shards"]) == 2
    for shard in one["shards"]:
        assert file_sha256(tmp_path / "one" / shard["url"]) == file_sha256(tmp_path / "two" / shard["url"]) == shard["sha256"]
    assert (tmp_path / "one" / "dataset.json").read_bytes() == (tmp_path / "two" / "dataset.json").read_bytes()


def test_existing_shards_are_not_mixed_with_new_ones(messy, tmp_path):
    quiet = {"progress": False, "log": lambda _: None, "workers": 1}
    convert(messy, tmp_path / "out", shard_size=1, **quiet)
    assert len(list((tmp_path / "out").glob("shard-*.tar"))) == 6
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(messy, tmp_path / "out", **quiet)
    convert(messy, tmp_path / "out", shard_size=4, overwrite=True, **quiet)
    assert len(list((tmp_path / "out").glob("shard-*.tar"))) == 2  # no stale shard left behind


def test_a_source_with_no_valid_sample_is_an_error(tmp_path):
    reader = ListReader([Problem("malformed_annotation", "a.xml", "broken")])
    with pytest.raises(ValueError, match="no valid sample"):
        convert(reader, tmp_path / "out", workers=1, progress=False, log=lambda _: None)
