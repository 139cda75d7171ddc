"""Where BASE layers go in the decoder stack."""

from typing import List, Optional

from fairseq_base.errors import BaseLayerConfigError


def paper_positions(num_layers: int, num_base_layers: int) -> List[int]:
    """The paper's even spacing: BASE layer i goes after decoder layer floor(i*L/(N+1))."""
    return [i * num_layers // (num_base_layers + 1) for i in range(1, num_base_layers + 1)]


def base_layer_positions(num_layers: int, num_base_layers: int, spec: Optional[str] = None) -> List[int]:
    """Parse and check ``--base-positions``; returns sorted positions in [0, L].

    Position k puts a BASE layer after decoder layer k (0: before the first layer);
    the token ``L`` stands for the last layer ("BASE Top").
    """
    if num_base_layers < 0:
        raise BaseLayerConfigError(f"--base-layers must be >= 0, got {num_base_layers}")
    if not spec:
        if num_base_layers > num_layers + 1:
            raise BaseLayerConfigError(
                f"--base-layers {num_base_layers} is more than the {num_layers + 1} places around "
                f"{num_layers} decoder layers (before each, and after the last); use at most {num_layers + 1}, "
                f"or more --decoder-layers")
        positions = paper_positions(num_layers, num_base_layers)
    else:
        try:
            positions = [num_layers if p.strip() == "L" else int(p) for p in spec.split(",")]
        except ValueError:
            raise BaseLayerConfigError(
                f"--base-positions {spec!r} is not a comma-separated list of layer numbers (or L)") from None
    if len(positions) != num_base_layers:
        raise BaseLayerConfigError(
            f"--base-positions {spec!r} lists {len(positions)} positions but --base-layers is "
            f"{num_base_layers}; give one position per BASE layer")
    if len(set(positions)) != len(positions):
        raise BaseLayerConfigError(
            f"--base-positions {spec or ','.join(map(str, positions))!r} repeats a position; "
            f"use distinct positions or fewer --base-layers (at most {num_layers + 1})")
    bad = [p for p in positions if not 0 <= p <= num_layers]
    if bad:
        raise BaseLayerConfigError(
            f"--base-positions {spec!r}: {bad} out of range; positions go from 0 to "
            f"--decoder-layers ({num_layers})")
    return sorted(positions)
