import torch

from ssd.data.synthetic import CLASSES, SyntheticDetection, render_sample


def test_deterministic_per_seed_and_index():
    a_img, a_t = render_sample(5, seed=3)
    b_img, b_t = render_sample(5, seed=3)
    assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])
    c_img, _ = render_sample(5, seed=4)
    assert c_img.shape != a_img.shape or not torch.equal(a_img, c_img)


def test_annotations_are_valid_and_varied():
    sizes, labels = [], []
    for i in range(150):
        image, target = render_sample(i)
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        h, w = image.shape[1:]
        boxes = target["boxes"]
        assert boxes.shape[0] == target["labels"].shape[0]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        sizes.append((boxes[:, 2:] - boxes[:, :2]).max(dim=1).values)
        labels.append(target["labels"])
    sizes, labels = torch.cat(sizes), torch.cat(labels)
    assert set(labels.tolist()) == set(range(1, len(CLASSES) + 1))
    assert (sizes < 16).sum() > 20, "small objects must be present"
    assert (sizes > 64).sum() > 20, "large objects must be present"


def test_dataset_applies_transform_and_carries_ids():
    ds = SyntheticDetection(4, seed=1, transform=lambda im, t: (im.float(), t))
    image, target = ds[2]
    assert image.dtype == torch.float32
    assert int(target["image_id"]) == 2
    assert target["orig_size"].tolist() == list(render_sample(2, seed=1)[0].shape[1:])


def test_cached_dataset_equals_rendering_on_demand_and_is_not_mutated_by_transforms():
    def shrink(image, target):
        target["boxes"] = target["boxes"] / 2  # a transform that rebinds a key of its dict
        return image, target

    cached = SyntheticDetection(3, seed=2, transform=shrink, cache=True)
    lazy = SyntheticDetection(3, seed=2, transform=shrink)
    for i in range(3):
        (a, ta), (b, tb) = cached[i], lazy[i]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    again = cached[0][1]["boxes"]
    assert torch.equal(again, lazy[0][1]["boxes"]), "the cache must not keep transformed boxes"
