"""The pipeline layout (stag_plugin.parallel.layout) against layouts written out by hand."""

import pytest

from stag_plugin.parallel.layout import (
    Segment,
    check_pipeline_size,
    pipeline_stages,
    replica_stages,
    shared_layer_stages,
)


def seg(section, first, count, per_section):
    return Segment(section, first, count, per_section)


def test_one_section_per_stage():
    stages = pipeline_stages(num_sections=2, layers_per_section=3, pipeline_size=2)
    assert [st.segments for st in stages] == [(seg(0, 0, 3, 3),), (seg(1, 0, 3, 3),)]
    assert [st.embeds for st in stages] == [True, True]
    assert stages[0].sends == stages[1].receives == ("memory",)
    assert stages[0].receives == stages[1].sends == ()


def test_sections_split_over_stages_carry_hidden_and_memory():
    stages = pipeline_stages(2, 2, 4, learned_combination=True)
    assert [st.segments for st in stages] == [
        (seg(0, 0, 1, 2),), (seg(0, 1, 1, 2),), (seg(1, 0, 1, 2),), (seg(1, 1, 1, 2),)]
    assert [st.sends for st in stages] == [
        ("hidden",), ("memory", "combined"), ("hidden", "memory", "combined"), ()]
    assert [st.receives for st in stages[1:]] == [st.sends for st in stages[:-1]]
    assert [st.embeds for st in stages] == [True, False, True, False]


def test_several_sections_on_one_stage():
    stages = pipeline_stages(4, 1, 2)
    assert [st.sections for st in stages] == [(0, 1), (2, 3)]
    assert stages[0].sends == ("memory",)
    single = pipeline_stages(3, 2, 1, learned_combination=True)
    assert len(single) == 1 and single[0].sections == (0, 1, 2)
    assert single[0].receives == single[0].sends == ()


def test_stage_boundary_inside_a_section_that_also_ends_one():
    # 3 sections x 2 layers on 2 stages: stage 0 = section 0 + layer 0 of section 1.
    stages = pipeline_stages(3, 2, 2)
    assert stages[0].segments == (seg(0, 0, 2, 2), seg(1, 0, 1, 2))
    assert stages[1].segments == (seg(1, 1, 1, 2), seg(2, 0, 2, 2))
    assert stages[0].sends == ("hidden", "memory")


def test_replica_holders():
    stages = pipeline_stages(2, 2, 4, learned_combination=True)
    holders = replica_stages(stages, tied_output=True)
    assert holders == {"word_embeddings": (0, 2, 3), "position_embeddings": (0, 2),
                       "null_memory": (2, 3), "combination_weights": (1, 3)}
    assert replica_stages(stages, tied_output=False)["word_embeddings"] == (0, 2)
    shared = shared_layer_stages(stages)
    assert shared[("layer", 0)] == (0, 2) and shared[("layer", 1)] == (1, 3)
    assert shared[("cross", 0)] == (2,) and shared[("final_norm", 0)] == (1, 3)


@pytest.mark.parametrize("size", [3, 5, 0])
def test_stage_boundaries_must_fall_on_layer_boundaries(size):
    with pytest.raises(ValueError, match="Fix: use one of \\[1, 2, 4\\]|must be an integer"):
        check_pipeline_size(2, 2, size)
