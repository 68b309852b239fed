"""Shard format and streaming: determinism, splitting across ranks and workers, step counts."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd.data.sharding import (
    ShardSlice,
    min_rank_samples,
    rank_slices,
    shard_order,
    steps_per_epoch,
    worker_split,
)
from ssd.data.shards import (
    ShardFormatError,
    ShardSet,
    ShardWriter,
    _tar_size,
    content_hash,
    encode_json,
    read_samples,
    tar_file_size,
)
from ssd.data.streaming import ShardLoader, ShardStream, pack_batch, rebatch, unpack_targets
from ssd.transforms import build_transform


def _jpeg(index: int, width: int = 24, height: int = 16) -> bytes:
    array = np.full((height, width, 3), index % 256, dtype=np.uint8)
    array[: height // 2, : width // 2] = (255 - index % 256, 0, 0)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _meta(index: int, width: int = 24, height: int = 16) -> dict:
    return {
        "boxes": [[1.0, 2.0, 11.5, 8.0], [0.0, 0.0, float(width), float(height)]],
        "labels": [1 + index % 3, 2],
        "difficult": [index % 5 == 0, False],
        "truncated": [False, True],
        "iscrowd": [False, index % 7 == 0],
        "width": width,
        "height": height,
        "image_id": 1000 + index,
        "source": f"test:{index}",
    }


def write_shards(out: Path, sizes: list[int]) -> ShardSet:
    """Shards holding ``sizes[i]`` samples each, keys s000000.., with a dataset.json."""
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, max_samples=10**9)
    index = 0
    for size in sizes:
        for _ in range(size):
            writer.write(f"s{index:06d}", _jpeg(index), _meta(index))
            index += 1
        writer._close_shard()
    shards = writer.close()
    info = {"format": "ssd-webdataset", "version": 1, "classes": ["a", "b", "c"], "shards": shards}
    (out / "dataset.json").write_text(json.dumps(info))
    return ShardSet.open(out)


def test_writer_rotates_by_count_and_size_and_is_deterministic(tmp_path):
    def write(out: Path, **limits) -> list[dict]:
        out.mkdir()
        writer = ShardWriter(out, **limits)
        for i in range(10):
            writer.write(f"k{i}", _jpeg(i), _meta(i))
        return writer.close()

    by_count = write(tmp_path / "a", max_samples=4)
    assert [s["samples"] for s in by_count] == [4, 4, 2]
    assert [s["url"] for s in by_count] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert write(tmp_path / "b", max_samples=4) == by_count  # same sha256, same bytes
    assert (tmp_path / "a" / "shard-000001.tar").read_bytes() == (tmp_path / "b" / "shard-000001.tar").read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))

    sizes = {_tar_size(len(_jpeg(i))) + _tar_size(len(encode_json(_meta(i)))) for i in range(10)}
    assert len(sizes) == 1  # every sample takes the same space here
    limit = tar_file_size(3 * sizes.pop())
    by_size = write(tmp_path / "c", max_samples=100, max_bytes=limit)
    assert [s["samples"] for s in by_size] == [3, 3, 3, 1]
    for shard in by_size:
        assert shard["bytes"] == (tmp_path / "c" / shard["url"]).stat().st_size <= limit

    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["k0.jpg", "k0.json"]
    assert {m.mtime for m in members} == {0} and {m.uname for m in members} == {""}
    assert content_hash(["x"], by_count) != content_hash(["y"], by_count)


def test_writer_rejects_keys_webdataset_would_split():
    writer = ShardWriter(".", max_samples=1)
    for key in ("a.b", "", "dir/x"):
        with pytest.raises(ValueError, match="key"):
            writer.write(key, b"", {})


def test_round_trip_through_webdataset(tmp_path):
    shards = write_shards(tmp_path, [3, 2])
    samples = list(read_samples(shards))
    assert [key for key, _, _ in samples] == [f"s{i:06d}" for i in range(5)]
    for i, (_, jpg, meta) in enumerate(samples):
        assert jpg == _jpeg(i) and meta == _meta(i)


def test_open_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        ShardSet.open(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ShardFormatError, match="dataset.json"):
        ShardSet.open(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "ssd-webdataset", "version": 1, "classes": []}))
    with pytest.raises(ShardFormatError, match="missing field 'shards'"):
        ShardSet.open(tmp_path / "dataset.json")


def test_shard_slice_counts_kept_samples():
    for count in range(7):
        for step in (1, 2, 3):
            for offset in range(step):
                for base in range(5):
                    piece = ShardSlice(0, step, offset, base)
                    expected = sum((base + p) % step == offset for p in range(count))
                    assert piece.kept(count) == expected


def _epoch_keys(shards: ShardSet, world: int, workers: int, train: bool, epoch: int = 0) -> list[list[str]]:
    per_rank = []
    for rank in range(world):
        stream = ShardStream(shards, train=train, rank=rank, world_size=world, seed=3)
        stream.set_epoch(epoch)
        keys = [s["__key__"] for w in range(workers) for s in stream.raw_samples(workers, w)]
        assert len(keys) == stream.num_rank_samples()
        per_rank.append(keys)
    return per_rank


@pytest.mark.parametrize("sizes", [[5], [4, 4, 4], [5, 3, 4, 1, 6], [2] * 7, [2] * 17 + [1] * 9])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_sample_exactly_once_across_ranks_and_workers(tmp_path, sizes, world, workers):
    shards = write_shards(tmp_path, sizes)
    all_keys = [f"s{i:06d}" for i in range(sum(sizes))]
    for train, epoch in ((False, 0), (True, 0), (True, 1)):
        per_rank = _epoch_keys(shards, world, workers, train, epoch)
        flat = [k for keys in per_rank for k in keys]
        assert Counter(flat) == Counter(all_keys), (train, epoch)
        # rank shares differ by at most the biggest size difference of whole shards, plus one
        shares = [len(keys) for keys in per_rank]
        assert min(shares) >= min_rank_samples(sizes, world)


def test_training_order_changes_per_epoch_and_evaluation_order_does_not(tmp_path):
    shards = write_shards(tmp_path, [3] * 6)
    assert _epoch_keys(shards, 2, 1, train=True, epoch=0) != _epoch_keys(shards, 2, 1, train=True, epoch=1)
    assert _epoch_keys(shards, 2, 1, train=True, epoch=1) == _epoch_keys(shards, 2, 1, train=True, epoch=1)
    assert _epoch_keys(shards, 2, 1, train=False, epoch=0) == _epoch_keys(shards, 2, 1, train=False, epoch=5)
    assert shard_order(6, 0, 0, shuffle=False) == list(range(6))


def test_min_rank_samples_is_the_worst_case_over_permutations():
    import itertools

    for sizes in ([5, 3, 4, 1, 6], [7, 7, 7, 2], [4], [1, 9]):
        for world in (1, 2, 3, 4, 6):
            worst = min(
                sum(s.kept(sizes[s.shard]) for s in rank_slices(sizes, order, world, rank))
                for order in itertools.permutations(range(len(sizes)))
                for rank in range(world)
            )
            assert min_rank_samples(sizes, world) == worst, (sizes, world)


def test_steps_per_epoch_and_a_clear_error_when_data_is_too_small():
    assert steps_per_epoch([256] * 6, world_size=2, batch_size=16) == 48
    # the short shard is split by sample: each rank gets 100 + 37 // 2 = 118 samples
    assert steps_per_epoch([100, 100, 37], world_size=2, batch_size=10) == 11
    # 6 shards on 2 ranks divide evenly, but splitting the short last one and one more is better:
    # 2 x 256 whole + (256 + 36) // 2 = 658 samples per rank instead of 36 + 2 x 256 = 548
    assert min_rank_samples([256] * 5 + [36], 2) == 658
    with pytest.raises(ValueError, match="full batch"):
        steps_per_epoch([5, 5], world_size=4, batch_size=4)


def test_worker_split_uses_whole_slices_only_when_each_worker_gets_many():
    slices = [ShardSlice(i) for i in range(16)]
    assert worker_split(slices, 2, 1) == (slices[1::2], 1, 0)
    assert worker_split(slices[:15], 2, 1) == (slices[:15], 2, 1)  # 7 and 8 would be uneven: by sample
    assert worker_split(slices[:1], 3, 2) == ([ShardSlice(0)], 3, 2)


def test_rebatch_cuts_exact_batches_without_copying_full_ones():
    def batch(n, start):
        return torch.arange(start, start + n).view(n, 1).float(), [{"i": start + k} for k in range(n)]

    full = batch(4, 0)
    out = list(rebatch([full, batch(3, 4), batch(4, 7), batch(2, 11)], 4, drop_last=False))
    assert out[0][0] is full[0]
    assert [len(t) for _, t in out] == [4, 4, 4, 1]
    assert torch.cat([images for images, _ in out]).flatten().tolist() == list(range(13))
    assert [t["i"] for _, targets in out for t in targets] == list(range(13))
    assert [len(t) for _, t in rebatch([batch(3, 0), batch(3, 3)], 4, drop_last=True)] == [4]


def test_decoded_training_samples_drop_crowd_and_evaluation_keeps_everything(tmp_path):
    shards = write_shards(tmp_path, [8])
    evaluation = list(ShardStream(shards, train=False))
    assert len(evaluation) == 8
    image, target = evaluation[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 24)
    assert target["boxes"].tolist() == _meta(0)["boxes"]
    assert target["labels"].tolist() == _meta(0)["labels"]
    assert target["iscrowd"].tolist() == [False, True] and target["difficult"].tolist() == [True, False]
    assert target["orig_size"].tolist() == [16, 24] and int(target["image_id"]) == 1000

    training = {int(t["image_id"]): t for _, t in ShardStream(shards, train=True, shuffle_buffer=4)}
    assert sorted(training) == list(range(1000, 1008))
    assert training[1000]["labels"].tolist() == [1]  # the crowd region is not a training target
    assert training[1001]["labels"].tolist() == [2, 2]
    no_difficult = {int(t["image_id"]): t for _, t in ShardStream(shards, train=True, keep_difficult=False)}
    assert no_difficult[1005]["labels"].tolist() == [2]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_gives_equal_full_steps_on_every_rank(tmp_path, num_workers):
    shards = write_shards(tmp_path, [7, 5, 6])  # uneven shards, 2 ranks
    transform = build_transform(32, strength=1.0, train=True)
    seen: list[int] = []
    steps = []
    for rank in range(2):
        loader = ShardLoader(ShardStream(shards, transform, train=True, rank=rank, world_size=2), 4, num_workers)
        loader.set_epoch(1)
        batches = list(loader)
        steps.append(len(batches))
        assert len(batches) == len(loader)
        for images, targets in batches:
            assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
            seen.extend(int(t["image_id"]) for t in targets)
    assert steps == [steps_per_epoch([7, 5, 6], 2, 4)] * 2 == [2, 2]
    assert len(seen) == len(set(seen)) == 16  # no sample twice in the epoch


def test_evaluation_loader_yields_every_sample_once(tmp_path):
    shards = write_shards(tmp_path, [7, 5, 6])
    transform = build_transform(32, strength=0.0, train=False, min_size=0.0)
    seen = []
    for rank in range(3):
        loader = ShardLoader(ShardStream(shards, transform, train=False, rank=rank, world_size=3), 4, num_workers=2)
        sizes = [len(targets) for _, targets in loader]
        assert len(sizes) == len(loader) and all(s == 4 for s in sizes[:-1])
        seen.extend(int(t["image_id"]) for _, targets in loader for t in targets)
    assert sorted(seen) == list(range(1000, 1018))


def test_count_mismatch_with_dataset_json_is_an_error(tmp_path):
    write_shards(tmp_path, [3, 2])
    info = json.loads((tmp_path / "dataset.json").read_text())
    info["shards"][1]["samples"] = 4
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ShardFormatError, match="shard-000001.tar: 2 samples, but dataset.json says 4"):
        list(ShardStream(ShardSet.open(tmp_path), train=False).raw_samples())


def test_pipe_and_s3_urls_stream_like_local_files(tmp_path, monkeypatch):
    write_shards(tmp_path / "local", [3, 2])
    info = json.loads((tmp_path / "local" / "dataset.json").read_text())
    # shard URLs as shell commands, as for object storage without a mounted file system
    for shard in info["shards"]:
        shard["url"] = f"pipe:cat {tmp_path / 'local' / shard['url']}"
    (tmp_path / "piped").mkdir()
    (tmp_path / "piped" / "dataset.json").write_text(json.dumps(info))
    piped = ShardSet.open(tmp_path / "piped")
    assert piped.urls[0].startswith("pipe:cat ")
    assert [k for k, _, _ in read_samples(piped)] == [k for k, _, _ in read_samples(ShardSet.open(tmp_path / "local"))]

    # s3:// goes through $SSD_S3_COMMAND; a stand-in CLI maps the bucket onto the local folder
    monkeypatch.setenv("SSD_S3_COMMAND", f"sh -c 'cat {tmp_path}/\"${{0#s3://bucket/}}\"' {{url}}")
    remote = ShardSet.open("s3://bucket/local/dataset.json")
    assert remote.urls == ("s3://bucket/local/shard-000000.tar", "s3://bucket/local/shard-000001.tar")
    assert len(list(ShardStream(remote, train=False))) == 5


def test_packed_batches_unpack_to_the_same_targets():
    targets = [
        {"boxes": torch.rand(n, 4), "labels": torch.arange(n), "iscrowd": torch.zeros(n, dtype=torch.bool),
         "image_id": torch.tensor(i), "orig_size": torch.tensor([10 + i, 20])}
        for i, n in enumerate([2, 0, 3])
    ]
    images, packed = pack_batch([(torch.full((3, 4, 4), float(i)), t) for i, t in enumerate(targets)])
    assert images.shape == (3, 3, 4, 4) and images[2].eq(2).all()
    assert packed["counts"].tolist() == [2, 0, 3] and packed["boxes"].shape == (5, 4)
    assert len(packed) == 6  # a handful of tensors per batch, whatever the batch size
    unpacked = unpack_targets(packed)
    assert len(unpacked) == 3
    for got, want in zip(unpacked, targets):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_join_spec_keeps_url_prefixes_intact(tmp_path):
    from ssd.data.shards import join_spec

    assert join_spec("s3://bucket/shards/voc", "train") == "s3://bucket/shards/voc/train"
    assert join_spec("https://host/voc/", "val") == "https://host/voc/val"
    assert join_spec(tmp_path, "train") == str(tmp_path / "train")
