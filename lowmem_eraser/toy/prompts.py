"""Training prompt pairs for erasing one attribute value of the toy world (e.g. the colour "red").

Each target caption (the concept, in a training phrasing) is paired with its preservation twin: the same
caption with the attribute swapped for another value. All phrasings of one attribute combination share the
same twin, so the anchored target (`loss.anchor: preservation`) of a combination is one video, not an average of
several; the twins cycle through the other values over the combinations, so every one is kept.
"""

from __future__ import annotations

from dataclasses import replace

from .evaluate import ATTRIBUTES, concept_attribute
from .world import TRAIN_PHRASINGS, all_attribute_combinations, caption


def prompt_pairs(concept: str) -> list[list[str]]:
    attribute = concept_attribute(concept)
    alternatives = [value for value in ATTRIBUTES[attribute] if value != concept]
    targets = [video for video in all_attribute_combinations() if getattr(video, attribute) == concept]
    pairs = []
    for i, video in enumerate(targets):
        for phrasing in TRAIN_PHRASINGS:
            twin = replace(video, **{attribute: alternatives[i % len(alternatives)]})
            pairs.append([caption(video, phrasing), caption(twin, phrasing)])
    return pairs
