"""Samples, the engine's names as columns: a sequence of Sample built from three parallel lists."""
import pytest

from service.samples import Sample, Samples


@pytest.fixture
def three():
    return Samples(["emma", "zq", "ava"], [-6.5, -20.25, -5.0], [True, False, True])


def test_iterates_and_indexes_as_sample_objects(three):
    assert list(three) == [Sample("emma", -6.5, True), Sample("zq", -20.25, False), Sample("ava", -5.0, True)]
    assert three[1] == Sample("zq", -20.25, False) and three[-1].name == "ava"
    assert len(three) == 3 and len(Samples()) == 0
    assert list(three.rows()) == [("emma", -6.5, True), ("zq", -20.25, False), ("ava", -5.0, True)]


def test_slices_and_filters_keep_the_columns_aligned(three):
    head = three[:2]
    assert isinstance(head, Samples) and head == Samples(["emma", "zq"], [-6.5, -20.25], [True, False])
    new = three.where([not k for k in three.in_training_data])
    assert new == Samples(["zq"], [-20.25], [False])
    assert len(three) == 3  # neither changed the original


def test_extend_appends_every_column(three):
    grown = Samples().extend(three).extend(three[2:])
    assert grown.names == ["emma", "zq", "ava", "ava"] and grown.logprobs[-1] == -5.0
    assert grown.in_training_data == [True, False, True, True]


def test_columns_of_unequal_lengths_are_refused():
    with pytest.raises(ValueError, match="unequal lengths: 2, 1, 2"):
        Samples(["a", "b"], [-1.0], [True, False])


def test_engine_results_are_samples_whose_flags_match_the_word_list(cpu_engine):
    from service.params import GenerateParams

    got = cpu_engine.generate(GenerateParams(num_samples=200, seed=11, prefix="ma"))
    assert isinstance(got, Samples) and len(got) == 200
    assert got.in_training_data == [n in cpu_engine.words for n in got.names]  # prefixed names looked up again
    assert any(got.in_training_data) and not all(got.in_training_data)
    assert all(isinstance(lp, float) and lp < 0 for lp in got.logprobs)
