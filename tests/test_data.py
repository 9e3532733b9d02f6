"""The digits default and the reference latent-folder layout."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tinyfusion_pl.data import DigitsDataModule, LatentDataError, LatentsDataModule, load_digits_tensors
from tinyfusion_pl.data.resumable import ResumableDataLoader, training_share


def test_digits_are_scaled_to_unit_range_and_keep_labels():
    images, labels = load_digits_tensors(8)
    raw = load_digits()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == -1.0 and images.max() == 1.0
    # 0 -> -1 and 16 -> 1, linearly
    torch.testing.assert_close(images[5, 0], torch.from_numpy(raw.images[5]).float() / 8 - 1)
    assert labels.tolist() == raw.target.tolist()


def test_digits_upsampled_to_16_stay_in_range():
    images, _ = load_digits_tensors(16)
    assert images.shape == (1797, 1, 16, 16)
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_digits_split_is_fixed_and_disjoint():
    first, second = DigitsDataModule(val_fraction=0.1), DigitsDataModule(val_fraction=0.1)
    first.setup(), second.setup()
    assert len(first.train_set) + len(first.val_set) == 1797 and len(first.val_set) == 180
    torch.testing.assert_close(first.val_set.tensors[0], second.val_set.tensors[0])
    train_rows = {tuple(row.flatten().tolist()) for row in first.train_set.tensors[0][:200]}
    overlap = sum(tuple(row.flatten().tolist()) in train_rows for row in first.val_set.tensors[0])
    assert overlap < 5  # sklearn digits hold a handful of exact duplicates, nothing more


def test_digits_batches_are_image_label_pairs():
    datamodule = DigitsDataModule(batch_size=32)
    datamodule.setup()
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (32, 1, 8, 8) and labels.dtype == torch.int64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"image_size": 12}, "image_size=12 is not supported"), ({"batch_size": 0}, "batch_size=0"),
     ({"val_fraction": 1.5}, "val_fraction=1.5")],
)
def test_digits_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


def write_latents(root, count=6, num_classes=5, shape=(2, 4, 4, 4)):
    (root / "imagenet256_features").mkdir(parents=True)
    (root / "imagenet256_labels").mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        np.save(root / "imagenet256_features" / f"{index}.npy", rng.standard_normal(shape).astype(np.float32))
        np.save(root / "imagenet256_labels" / f"{index}.npy", np.array([index % num_classes]))


def test_latents_pick_the_image_or_its_flip(tmp_path):
    write_latents(tmp_path)
    datamodule = LatentsDataModule(str(tmp_path), num_classes=5, batch_size=2, val_fraction=0.0, num_workers=0)
    stored = np.load(tmp_path / "imagenet256_features" / "3.npy")
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        latent, label = datamodule.dataset[3]
        assert label == 3
        matches = [np.allclose(latent.numpy(), stored[i]) for i in range(2)]
        assert sum(matches) == 1
        seen.add(matches.index(True))
    assert seen == {0, 1}
    assert datamodule.in_channels == 4
    latents, labels = next(iter(datamodule.train_dataloader()))
    assert latents.shape == (2, 4, 4, 4) and labels.shape == (2,)


def test_latents_empty_folder(tmp_path):
    (tmp_path / "imagenet256_features").mkdir()
    (tmp_path / "imagenet256_labels").mkdir()
    with pytest.raises(LatentDataError, match="holds no .npy files"):
        LatentsDataModule(str(tmp_path))


def test_latents_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(LatentDataError, match="Point data.root at the folder"):
        LatentsDataModule(str(tmp_path))


def test_latents_mismatched_counts(tmp_path):
    write_latents(tmp_path)
    (tmp_path / "imagenet256_labels" / "0.npy").unlink()
    with pytest.raises(LatentDataError, match="holds 6 files but .* holds 5"):
        LatentsDataModule(str(tmp_path), num_classes=5)


def test_latents_label_out_of_range_names_the_file(tmp_path):
    write_latents(tmp_path)
    np.save(tmp_path / "imagenet256_labels" / "2.npy", np.array([7]))
    with pytest.raises(LatentDataError, match=r"2\.npy holds label 7, outside \[0, 5\)"):
        LatentsDataModule(str(tmp_path), num_classes=5)


def test_latents_unreadable_file_names_the_file(tmp_path):
    write_latents(tmp_path)
    (tmp_path / "imagenet256_features" / "4.npy").write_bytes(b"not an array")
    with pytest.raises(LatentDataError, match=r"4\.npy is not a readable \.npy file"):
        LatentsDataModule(str(tmp_path), num_classes=5)


def test_latents_inconsistent_shape_names_the_file(tmp_path):
    write_latents(tmp_path)
    np.save(tmp_path / "imagenet256_features" / "5.npy", np.zeros((2, 4, 8, 8), dtype=np.float32))
    with pytest.raises(LatentDataError, match=r"5\.npy has latent shape \(4, 8, 8\)"):
        LatentsDataModule(str(tmp_path), num_classes=5)


# ---------------------------------------------------------------------------------------- resumable shuffling


def labels_of(batches) -> list[list[int]]:
    return [labels.tolist() for _, labels in batches]


def take(loader, count: int) -> list:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def test_a_loader_restored_from_its_state_continues_with_the_next_batch_across_passes():
    dataset = torch.utils.data.TensorDataset(torch.zeros(10, 1), torch.arange(10))
    first = ResumableDataLoader(dataset, batch_size=3, shuffle=True, drop_last=True, seed=7)
    whole = labels_of(take(first, 3) + take(first, 3) + take(first, 3))  # three passes of 3 batches
    assert whole[:3] != whole[3:6] != whole[6:]  # every pass has its own order
    interrupted = ResumableDataLoader(dataset, batch_size=3, shuffle=True, drop_last=True, seed=7)
    seen = labels_of(take(interrupted, 3) + take(interrupted, 2))  # killed after batch 2 of pass 1
    state = interrupted.state_dict()
    assert state == {"seed": 7, "pass": 1, "position": 2}
    torch.manual_seed(1234)  # the global generator has no say in the order
    resumed = ResumableDataLoader(dataset, batch_size=3, shuffle=True, drop_last=True)
    resumed.load_state_dict(state)
    assert len(resumed) == 3
    assert seen + labels_of(take(resumed, 1) + take(resumed, 3)) == whole


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_take_shares_whose_kth_batches_make_one_processs_kth_batch_in_every_pass(replicas):
    dataset = torch.utils.data.TensorDataset(torch.zeros(20, 1), torch.arange(20))
    one = ResumableDataLoader(dataset, batch_size=2 * replicas, shuffle=True, drop_last=True, seed=5)
    shares = [ResumableDataLoader(dataset, batch_size=2, shuffle=True, drop_last=True, seed=5, share=(replicas, rank))
              for rank in range(replicas)]
    assert all(isinstance(share.sampler, torch.utils.data.DistributedSampler) for share in shares)  # Lightning keeps it
    assert all(len(share) == len(one) == 20 // (2 * replicas) for share in shares)
    for _ in range(2):  # two passes
        whole = [labels.tolist() for _, labels in take(one, len(one))]
        dealt = [[labels.tolist() for _, labels in take(share, len(share))] for share in shares]
        for step, batch in enumerate(whole):
            # rank r's j-th sample is sample r + j * replicas of the global batch
            assert [dealt[index % replicas][step][index // replicas] for index in range(len(batch))] == batch


def test_a_rank_share_resumes_where_its_state_left_it():
    dataset = torch.utils.data.TensorDataset(torch.zeros(12, 1), torch.arange(12))
    whole = labels_of(take(ResumableDataLoader(dataset, batch_size=2, shuffle=True, seed=1, share=(2, 1)), 3))
    interrupted = ResumableDataLoader(dataset, batch_size=2, shuffle=True, seed=1, share=(2, 1))
    seen = labels_of(take(interrupted, 1))
    resumed = ResumableDataLoader(dataset, batch_size=2, shuffle=True, share=(2, 1))
    resumed.load_state_dict(interrupted.state_dict())
    assert seen + labels_of(take(resumed, 2)) == whole


def test_a_datamodule_outside_a_running_fit_deals_the_whole_order():
    datamodule = DigitsDataModule(batch_size=16)
    datamodule.setup()
    assert training_share(datamodule.trainer) == (1, 0)
    assert type(datamodule.train_dataloader().sampler).__name__ == "PassPermutation"


def test_a_loader_with_a_sampler_from_outside_skips_the_batches_already_seen():
    dataset = torch.utils.data.TensorDataset(torch.zeros(8, 1), torch.arange(8))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
    whole = labels_of(take(ResumableDataLoader(dataset, batch_size=2, sampler=sampler, seed=0), 4))
    resumed = ResumableDataLoader(dataset, batch_size=2, sampler=sampler, seed=0)
    resumed.load_state_dict({"seed": 0, "pass": 0, "position": 1})
    assert labels_of(take(resumed, 3)) == whole[1:]


def test_digits_shuffle_without_the_global_generator_once_the_loader_exists():
    datamodule = DigitsDataModule(batch_size=16)
    datamodule.setup()
    torch.manual_seed(0)
    loader = datamodule.train_dataloader()
    state = torch.get_rng_state()
    first = labels_of(take(loader, 2))
    assert torch.equal(torch.get_rng_state(), state)  # iterating drew nothing from the global generator
    torch.manual_seed(0)
    assert labels_of(take(datamodule.train_dataloader(), 2)) == first  # the seed came from L.seed_everything's
