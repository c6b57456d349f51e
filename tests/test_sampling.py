import numpy as np
import pytest

from landmark_unet.data.slices import EpochShuffle, ForegroundOversampler, SkipTrained


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


def test_skip_trained_moves_the_trained_draws_of_one_pass_to_its_end():
    """A run continued mid-epoch: the draws already trained on go last (never reached), once."""
    full = list(EpochShuffle(20, seed=1, epoch=3))
    sampler = SkipTrained(EpochShuffle(20, seed=1, epoch=3), 8)
    assert len(sampler) == 20
    assert list(sampler) == full[8:] + full[:8]
    sampler.set_epoch(3)  # reaches the wrapped sampler; later passes are whole
    assert list(sampler) == full


@pytest.mark.parametrize("n, batch, ranks, done", [(23, 2, 2, 3), (40, 4, 2, 1), (37, 3, 3, 2), (16, 8, 1, 1)])
def test_skip_trained_under_lightnings_ddp_wrapper_gives_each_rank_the_batches_it_had_left(n, batch, ranks, done):
    """Under DDP Lightning wraps the sampler (DistributedSamplerWrapper); skipping done x batch x ranks draws
    gives every rank the rest of the share it would have drawn uninterrupted."""
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

    def shares(sampler_of):
        return [list(DistributedSamplerWrapper(sampler_of(), num_replicas=ranks, rank=r, shuffle=False))
                for r in range(ranks)]

    uninterrupted = shares(lambda: EpochShuffle(n, seed=0, epoch=0))
    resumed = shares(lambda: SkipTrained(EpochShuffle(n, seed=0, epoch=0), done * batch * ranks))
    for before, after in zip(uninterrupted, resumed):
        left = before[done * batch:]
        assert after[:len(left)] == left
