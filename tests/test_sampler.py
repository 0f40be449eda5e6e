import numpy as np
import pytest

from minigpt.data.sampler import ResumableSampler, SamplerError


def global_batches(num_samples, micro, accum, world, steps, seed=7):
    """For each step: the sorted union of indices over ranks and micro-steps."""
    samplers = [ResumableSampler(num_samples, micro, accum, rank, world, seed=seed) for rank in range(world)]
    out = []
    for _ in range(steps):
        step = np.concatenate([np.concatenate(s.next_step()) for s in samplers])
        out.append(sorted(step.tolist()))
    return out


def test_each_step_sees_the_same_samples_on_any_world_size_with_the_same_global_batch():
    one_rank = global_batches(1000, micro=8, accum=2, world=1, steps=20)
    two_ranks = global_batches(1000, micro=4, accum=2, world=2, steps=20)
    four_ranks = global_batches(1000, micro=2, accum=2, world=4, steps=20)
    assert one_rank == two_ranks == four_ranks


def test_ranks_never_share_a_sample_within_a_step():
    samplers = [ResumableSampler(500, 4, 3, rank, 2, seed=1) for rank in range(2)]
    for _ in range(10):
        a, b = (np.concatenate(s.next_step()) for s in samplers)
        assert not set(a) & set(b)
        assert len(set(a)) == len(a) == 12


def test_resumed_sampler_continues_exactly_where_the_saved_one_was():
    original = ResumableSampler(300, 5, 2, seed=3)
    for _ in range(37):  # crosses several epochs (30 samples per step, 10 steps per epoch)
        original.next_step()
    resumed = ResumableSampler(300, 5, 2, seed=3)
    resumed.load_state_dict(original.state_dict())
    for _ in range(25):
        assert [m.tolist() for m in original.next_step()] == [m.tolist() for m in resumed.next_step()]


def test_state_saved_on_two_ranks_resumes_on_one_rank():
    ranks = [ResumableSampler(400, 4, 1, r, 2, seed=5) for r in range(2)]
    for _ in range(13):
        for s in ranks:
            s.next_step()
    single = ResumableSampler(400, 8, 1, 0, 1, seed=5)
    single.load_state_dict(ranks[0].state_dict())
    for _ in range(20):
        both = sorted(np.concatenate([np.concatenate(s.next_step()) for s in ranks]).tolist())
        assert both == sorted(np.concatenate(single.next_step()).tolist())


def test_every_sample_is_seen_once_per_epoch_and_epochs_are_reshuffled():
    sampler = ResumableSampler(64, 8, 1, seed=0)
    first = np.concatenate([sampler.next_step()[0] for _ in range(8)])
    second = np.concatenate([sampler.next_step()[0] for _ in range(8)])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(64))
    assert first.tolist() != second.tolist()


def test_too_small_dataset_and_changed_batch_are_clear_errors():
    with pytest.raises(ValueError, match="needs 32"):
        ResumableSampler(10, 8, 2, 0, 2)
    state = ResumableSampler(100, 4, 1).state_dict()
    with pytest.raises(ValueError, match="global batch"):
        ResumableSampler(100, 8, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="data changed"):
        ResumableSampler(120, 4, 1).load_state_dict(state)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("position", -3, "sampler.position must be a non-negative integer"),
    ("position", 1e30, "sampler.position must be a non-negative integer"),
    ("position", 10**30, "sampler.position must be an integer from 0 to 120"),
    ("epoch", "2", "sampler.epoch must be a non-negative integer"),
    ("seed", -1, "sampler.seed must be a non-negative integer"),
    ("num_samples", None, "sampler.num_samples must be a non-negative integer"),
])
def test_a_sampler_state_of_the_wrong_type_or_range_is_refused_by_field(field, value, says):
    state = {**ResumableSampler(120, 4, 1).state_dict(), field: value}
    with pytest.raises(SamplerError, match=says):
        ResumableSampler(120, 4, 1).load_state_dict(state)


def test_a_sampler_state_missing_a_field_is_refused_by_field():
    state = ResumableSampler(120, 4, 1).state_dict()
    del state["position"]
    with pytest.raises(SamplerError, match="sampler.position: missing"):
        ResumableSampler(120, 4, 1).load_state_dict(state)
