"""Training prompt pairs for erasing one attribute value of the toy world (e.g. the colour "red").

Each target caption (the concept, in a training phrasing) is paired with its preservation twin: the same
caption with the attribute swapped for another value. All phrasings of one attribute combination share the
same twin, so the anchored target (`loss.anchor: preservation`) of a combination is one video, not an average of
several; the twins cycle through the other values over the combinations, so every one is kept.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ..errors import ConfigError

from .evaluate import ATTRIBUTES, concept_attribute
from .world import TRAIN_PHRASINGS, all_attribute_combinations, caption


def prompt_pairs(concept: str, erased_together: Sequence[str] = ()) -> list[list[str]]:
    """`concept`'s pairs. `erased_together`: the other concepts one eraser erases with it (`concepts:`); then a
    twin shows none of them either (erasing red + square, the twin of "a red square moving left" is e.g. "a green
    ball moving left": an anchor that is a target of the other concept would teach the eraser to keep it)."""
    attribute = concept_attribute(concept)
    erased = {concept, *erased_together}
    alternatives = [value for value in ATTRIBUTES[attribute] if value not in erased]
    if not alternatives:
        raise ConfigError(f"concept: erasing {', '.join(sorted(erased))} together leaves no {attribute} for the "
                          "preservation twins")
    others = {name: [value for value in ATTRIBUTES[name] if value not in erased]
              for name in ATTRIBUTES if name != attribute and erased & set(ATTRIBUTES[name])}
    for name, kept in others.items():
        if not kept:
            raise ConfigError(f"concept: erasing {', '.join(sorted(erased))} together leaves no {name} for the "
                              "preservation twins")
    targets = [video for video in all_attribute_combinations() if getattr(video, attribute) == concept]
    pairs = []
    for i, video in enumerate(targets):
        swaps = {attribute: alternatives[i % len(alternatives)]}
        swaps.update({name: kept[i % len(kept)] for name, kept in others.items() if getattr(video, name) in erased})
        twin = replace(video, **swaps)
        for phrasing in TRAIN_PHRASINGS:
            pairs.append([caption(video, phrasing), caption(twin, phrasing)])
    return pairs
