"""Which layers live on which pipeline stage, and what crosses each stage boundary.

The one place that decides the pipeline layout of a StagGPTModel. The model's depth is
`num_sections x layers_per_section` layers in section order; pipeline stage s holds the s-th
contiguous run of `num_layers / pipeline_size` of them. Pipeline size = number of sections puts
one section on each stage; any size that divides the depth is allowed (a stage may hold several
sections, or part of one).

Exactly one tensor crosses each stage boundary (Megatron's schedules carry one tensor forward and
its gradient back). It packs, along the hidden dimension, the streams the rest of the model needs:

    hidden    the running hidden state of a section cut by the boundary
    memory    the (unshifted) output of the section before the next layer's section: the
              cross-attention memory of every layer of the next section
    combined  sum_k alpha_k * out_k over finished sections ("learned" output combination)

Every stage whose first layer starts a section re-embeds the token ids (its embedding is a
pipeline replica of stage 0's; see `replica_stages`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from stag_plugin.errors import StagError

STREAMS = ("hidden", "memory", "combined")


@dataclass(frozen=True)
class Segment:
    """Layers [first_layer, first_layer + num_layers) of section `section` on one stage."""

    section: int
    first_layer: int
    num_layers: int
    layers_per_section: int
    normalises: bool = True  # ends in the section's final norm (when it ends the section)

    @property
    def starts_section(self) -> bool:
        return self.first_layer == 0

    @property
    def ends_section(self) -> bool:
        return self.first_layer + self.num_layers == self.layers_per_section

    @property
    def final_norm(self) -> bool:
        """Whether the section's final norm runs after this segment's last layer."""
        return self.ends_section and self.normalises


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its segments in order, and the streams it receives and sends."""

    index: int
    segments: Tuple[Segment, ...]
    receives: Tuple[str, ...]
    sends: Tuple[str, ...]

    @property
    def embeds(self) -> bool:
        """Whether this stage embeds token ids (it starts a section)."""
        return any(seg.starts_section for seg in self.segments)

    @property
    def sections(self) -> Tuple[int, ...]:
        return tuple(seg.section for seg in self.segments)


def pipeline_stages(num_sections: int, layers_per_section: int, pipeline_size: int,
                    learned_combination: bool = False,
                    memory_norm: bool = True) -> Tuple[Stage, ...]:
    """The stages of a `num_sections x layers_per_section` model on `pipeline_size` stages
    (`memory_norm` False: only the last section ends in a final norm)."""
    depth = num_sections * layers_per_section
    check_pipeline_size(num_sections, layers_per_section, pipeline_size)
    per_stage = depth // pipeline_size
    normalised = set(range(num_sections)) if memory_norm else {num_sections - 1}
    segments = [_segments(s * per_stage, per_stage, layers_per_section, normalised)
                for s in range(pipeline_size)]
    boundaries = [()] + [_streams_after(segs[-1], learned_combination) for segs in segments[:-1]]
    return tuple(Stage(s, segments[s], boundaries[s],
                       boundaries[s + 1] if s + 1 < pipeline_size else ())
                 for s in range(pipeline_size))


def check_pipeline_size(num_sections: int, layers_per_section: int, pipeline_size: int) -> None:
    depth = num_sections * layers_per_section
    if not isinstance(pipeline_size, int) or pipeline_size < 1:
        raise StagError(f"pipeline_model_parallel_size={pipeline_size!r} must be an integer >= 1",
                        "use 1, or a divisor of the number of layers")
    if depth % pipeline_size:
        sizes = [d for d in range(1, depth + 1) if depth % d == 0]
        raise StagError(
            f"pipeline_model_parallel_size={pipeline_size} does not divide the {depth} layers "
            f"({num_sections} sections x {layers_per_section} layers): stage boundaries must "
            f"fall on layer boundaries", f"use one of {sizes} ({num_sections} puts one "
            "section on each stage)")


def _segments(start: int, count: int, layers_per_section: int,
              normalised: set) -> Tuple[Segment, ...]:
    out, layer = [], start
    while layer < start + count:
        section, first = divmod(layer, layers_per_section)
        take = min(layers_per_section - first, start + count - layer)
        out.append(Segment(section, first, take, layers_per_section, section in normalised))
        layer += take
    return tuple(out)


def _streams_after(last: Segment, learned_combination: bool) -> Tuple[str, ...]:
    """Streams crossing the boundary that follows segment `last`."""
    if last.ends_section:
        finished = last.section + 1  # sections 0..last.section are done
        streams = ["memory"]
    else:
        finished = last.section
        streams = ["hidden"] + (["memory"] if last.section > 0 else [])
    if learned_combination and finished > 0:
        streams.append("combined")
    return tuple(streams)


def replica_stages(stages: Tuple[Stage, ...], tied_output: bool) -> Dict[str, Tuple[int, ...]]:
    """For each kind of pipeline-replicated parameter, the stages that hold a copy.

    word_embeddings: stages that embed, plus the last stage when the head is tied to them;
    position_embeddings: stages that embed; null_memory: stages running a later section;
    combination_weights: stages finishing a section (learned combination).
    """
    last = stages[-1].index
    embeds = tuple(st.index for st in stages if st.embeds)
    words = tuple(sorted(set(embeds) | ({last} if tied_output else set())))
    later = tuple(st.index for st in stages if any(k > 0 for k in st.sections))
    finishing = tuple(st.index for st in stages if any(seg.ends_section for seg in st.segments))
    return {"word_embeddings": words, "position_embeddings": embeds, "null_memory": later,
            "combination_weights": finishing}


def shared_layer_stages(stages: Tuple[Stage, ...]) -> Dict[Tuple[str, int], Tuple[int, ...]]:
    """Shared weights: for ("layer", i) / ("cross", i) / ("final_norm", 0), the holding stages.

    ("layer", i): layer i's self-attention, MLP and norms, run by every section;
    ("cross", i): layer i's cross-attention, run by sections 2..p; ("final_norm", 0): the
    sections' final norm (the last section's only, without memory_norm).
    """
    holders: Dict[Tuple[str, int], set] = {}
    for st in stages:
        for seg in st.segments:
            for i in range(seg.first_layer, seg.first_layer + seg.num_layers):
                holders.setdefault(("layer", i), set()).add(st.index)
                if seg.section > 0:
                    holders.setdefault(("cross", i), set()).add(st.index)
            if seg.final_norm:
                holders.setdefault(("final_norm", 0), set()).add(st.index)
    return {key: tuple(sorted(v)) for key, v in holders.items()}
