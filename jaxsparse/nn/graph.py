"""Graph surgery on NNX models: paths, finding and replacing convolutions, input shapes."""

from __future__ import annotations

import typing as tp

import jax.numpy as jnp
from flax import nnx


def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def parse_path(key: str) -> tuple:
    """The inverse of `path_str` (integer parts become list indices)."""
    return tuple(int(p) if p.isdigit() else p for p in key.split("/"))


def find_convs(model) -> list[tuple[tuple, nnx.Conv]]:
    return [(tuple(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Conv)]


def get_child(node, key):
    if isinstance(key, str) and not isinstance(node, (dict, tp.Mapping)) and hasattr(node, key):
        return getattr(node, key)
    return node[key]


def get_by_path(model, path: tuple):
    node = model
    for key in path:
        node = get_child(node, key)
    return node


def set_by_path(model, path: tuple, value) -> None:
    node = get_by_path(model, path[:-1])
    key = path[-1]
    if isinstance(key, str) and isinstance(node, nnx.Module):
        setattr(node, key, value)
    else:
        node[key] = value


class _ShapeRecorder(nnx.Module):
    """Stands in for a conv while tracing the model, recording its input shape."""
    sink: tp.ClassVar[dict] = {}

    def __init__(self, conv, key: str):
        self.conv = conv
        self.key = key

    def __call__(self, x, *args, **kwargs):
        _ShapeRecorder.sink[self.key] = (tuple(x.shape), jnp.dtype(x.dtype).name)
        return self.conv(x, *args, **kwargs)


def capture_input_shapes(model, sample_input, call: tp.Callable | None = None) -> dict[str, tuple]:
    """``{conv path: (input shape, input dtype)}`` from one abstract trace of the model."""
    convs = find_convs(model)
    call = call or (lambda m, x: m(x))
    work = nnx.clone(model)
    for path, conv in find_convs(work):
        set_by_path(work, path, _ShapeRecorder(conv, path_str(path)))
    _ShapeRecorder.sink = {}
    try:
        nnx.eval_shape(call, work, sample_input)
        shapes = dict(_ShapeRecorder.sink)
    finally:
        _ShapeRecorder.sink = {}
    missing = [path_str(p) for p, _ in convs if path_str(p) not in shapes]
    if missing:
        raise ValueError(f"these convolutions were not called on sample_input: {missing}")
    return shapes
