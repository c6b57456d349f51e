import numpy as np
import pytest

from landmark_unet.data.slices import EpochShuffle, ForegroundOversampler, RankShare


def test_oversampler_fraction_and_determinism():
    fg = np.arange(10, 20)
    s = ForegroundOversampler(fg, total=200, fraction=0.4, num_samples=5000, seed=1)
    first = list(s)
    share = np.isin(first, fg).mean()
    # forced 40 % plus the uniform draws that land on the 10 foreground slices out of 200 (5 % of 60 %)
    assert share == pytest.approx(0.4 + 0.6 * 10 / 200, abs=0.03)
    assert min(first) >= 0 and max(first) < 200
    second = list(s)
    assert first != second  # a new draw each epoch
    again = ForegroundOversampler(fg, total=200, fraction=0.4, num_samples=5000, seed=1)
    assert list(again) == first  # same seed, same epoch, same draw


def test_default_epoch_length_keeps_the_organ_slice_count():
    s = ForegroundOversampler(np.arange(30), total=300, fraction=0.5)
    assert len(s) == 60 and len(list(s)) == 60


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError):
        ForegroundOversampler(np.arange(3), total=10, fraction=fraction)


@pytest.mark.parametrize("make", [lambda **kw: EpochShuffle(50, seed=3, **kw),
                                  lambda **kw: ForegroundOversampler(np.arange(5), total=50, fraction=0.5, seed=3, **kw)])
def test_epoch_draw_depends_on_seed_and_epoch_only(make):
    """A resumed run builds a fresh sampler at its epoch: it must draw what the long-running sampler drew then."""
    running = make()
    epochs = []
    for e in range(3):
        running.set_epoch(e)  # as Lightning does before each training epoch
        epochs.append(list(running))
    assert epochs[0] != epochs[1] != epochs[2]
    assert list(make(epoch=2)) == epochs[2]
    unset = make()  # without set_epoch (a DDP-wrapped sampler) the epoch counts up per pass
    assert [list(unset) for _ in range(3)] == epochs


def test_shuffle_is_a_permutation():
    assert sorted(EpochShuffle(40, seed=0)) == list(range(40))


def test_rank_share_leaves_out_the_draws_trained_in_its_first_pass_only():
    """A run continued mid-epoch: the draws already trained on are left out of that pass (which ends where the
    uninterrupted one did); its length stays the whole pass's, and later passes are whole."""
    full = list(EpochShuffle(20, seed=1, epoch=3))
    sampler = RankShare(EpochShuffle(20, seed=1, epoch=3), skip=8)
    assert len(sampler) == 20
    assert list(sampler) == full[8:]
    sampler.set_epoch(3)  # reaches the wrapped sampler
    assert list(sampler) == full


@pytest.mark.parametrize("n, batch, ranks, done", [(23, 2, 2, 3), (40, 4, 2, 1), (37, 3, 3, 2), (16, 8, 1, 1),
                                                   (25, 4, 1, 2), (31, 4, 3, 0)])
def test_rank_share_deals_as_lightnings_ddp_wrapper_and_keeps_the_epochs_batches(n, batch, ranks, done):
    """Every rank's share is the one Lightning's DistributedSamplerWrapper would deal it (padding included), less
    the done x batch draws it has trained on; batched, the continued pass gives the uninterrupted pass's remaining
    batches, its last, partial batch too (a pass moved rather than cut filled that one with trained draws)."""
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

    def batches(draws):
        return [draws[i:i + batch] for i in range(0, len(draws), batch)]

    for r in range(ranks):
        lightning = list(DistributedSamplerWrapper(EpochShuffle(n, seed=0), num_replicas=ranks, rank=r,
                                                   shuffle=False))
        share = RankShare(EpochShuffle(n, seed=0), num_replicas=ranks, rank=r, skip=done * batch)
        assert len(share) == len(lightning)
        assert batches(list(share)) == batches(lightning)[done:]


@pytest.mark.parametrize("make", [lambda **kw: EpochShuffle(30, seed=3, **kw),
                                  lambda **kw: ForegroundOversampler(np.arange(5), total=30, fraction=0.5, seed=3, **kw)])
def test_crop_origins_come_with_the_draw_and_depend_on_seed_and_epoch_only(make):
    """With crop_origins every draw is (position, u, v): the same positions as without, and origins in [0, 1)
    that a fresh sampler at that epoch draws again and that a continued pass keeps with their positions."""
    plain, drawn = list(make(epoch=2)), list(make(epoch=2, crop_origins=True))
    assert [d[0] for d in drawn] == plain
    origins = np.array([d[1:] for d in drawn])
    assert origins.shape == (len(plain), 2) and (origins >= 0).all() and (origins < 1).all()
    assert len(np.unique(origins[:, 0])) == len(plain)  # a fresh origin for every draw
    assert list(make(epoch=2, crop_origins=True)) == drawn
    assert list(make(epoch=3, crop_origins=True)) != drawn
    assert list(RankShare(make(epoch=2, crop_origins=True), skip=7)) == drawn[7:]


def test_a_cropped_slice_is_placed_by_its_draws_origin(tmp_path):
    """SliceDataset: a draw (position, u, v) crops the window at floor(u * (X - crop + 1)), floor(v * ...); the
    same draw gives the same sample, and a plain position still gets a window."""
    import torch
    from conftest import compose_train
    from hydra.utils import instantiate

    cfg = compose_train(["data.phantom.n_subjects=3", "data.phantom.shape=[48,48,48]", "data.phantom.workers=1",
                         "data.num_workers=0", "data.split.rounds=3", "data.crop=32"], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    ds = dm.dataset("train", organ_slices_only=False)
    whole = dm.dataset("train", organ_slices_only=False)
    whole.crop = None
    x, y = whole[5]["image"].shape[-2:]
    assert (x, y) == (48, 48)
    for u, v in [(0.0, 0.0), (0.5, 0.25), (0.999, 0.999)]:
        x0, y0 = int(u * (x - 32 + 1)), int(v * (y - 32 + 1))
        batch = ds.__getitems__([(5, u, v), (5, u, v)])
        assert torch.equal(batch["image"][0], whole[5]["image"][:, x0:x0 + 32, y0:y0 + 32])
        assert torch.equal(batch["image"][0], batch["image"][1])
    assert ds[5]["image"].shape[-2:] == (32, 32)


def test_a_run_with_crops_and_augmentation_trains_the_same_with_any_number_of_loader_workers(tmp_path):
    """Crop origins come with the sampler's draws and augmentation from a generator seeded per batch: the loader's
    workers (a speed setting) do not change what is trained. (Before, crops were drawn in the workers, from their
    own seeds, or from torch's global generator between the augmentation's draws.)"""
    from conftest import compose_train

    from landmark_unet.train import train

    run = ["data.phantom.n_subjects=6", "data.phantom.shape=[48,48,48]", "data.phantom.workers=1",
           "model.net.features=4", "data.batch_size=4", "data.split.rounds=3", "data.sampling=oversample",
           "trainer.max_epochs=2", "trainer.deterministic=true", "augmentation=all", "data.crop=32"]
    results = [train(compose_train(run + [f"data.num_workers={n}"], tmp_path / str(n))) for n in (0, 2)]
    assert results[0]["history"]["epoch"] == [0, 1]
    assert results[0]["history"] == results[1]["history"]
    assert results[0]["test"] == results[1]["test"]
