"""ToMe's schedule of tokens merged per layer (``tome/utils.py::parse_r``, docs/tome.md).

The model configs take a :data:`TomeR` and expand it with :func:`parse_r`; the ViT block that merges between attention and
MLP with proportional attention is :class:`vlcore.nn.transformer.Block` (``tome_r``, ``size``).
"""

from __future__ import annotations

from typing import Union

TomeR = Union[int, list, tuple]


def parse_r(num_layers: int, r: TomeR) -> list[int]:
    """Tokens to merge at each of ``num_layers`` layers, exactly as ToMe's ``parse_r``:

    - an int ``r``: ``r`` at every layer;
    - a list: used as given, padded with zeros to ``num_layers`` (a longer list is returned whole);
    - a tuple ``(r, inflect)``: linear from ``first = int(r * (1 - inflect))`` at the first layer to
      ``2r - first`` at the last, each value truncated by ``int()``. ``inflect = 0`` is constant,
      ``(r, -1)`` the paper's decreasing schedule (``2r`` first, ``0`` last), ``(r, 1)`` increasing.

    One layer gets ``first`` (ToMe divides by ``num_layers - 1`` there). Values are not capped: the ops cap
    each layer's r at half of the tokens it can merge.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"parse_r: num_layers must be an int >= 0, got {num_layers!r}")
    if isinstance(r, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
            raise TypeError(f"parse_r: a list schedule must hold ints, got {r!r}")
        return list(r) + [0] * (num_layers - len(r))
    inflect = 0.0
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"parse_r: a tuple schedule is (r, inflect), got {r!r}")
        r, inflect = r
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"parse_r: r must be an int, a list of ints or (r, inflect), got {r!r}")
    first = int(r * (1.0 - inflect))
    last = 2 * r - first
    step = (last - first) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(first + step * i) for i in range(num_layers)]


__all__ = ["parse_r", "TomeR"]
