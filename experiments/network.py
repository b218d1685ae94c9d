r"""Whole-network run: dense vs sparse forward passes under one `jax.jit`.

Networks (every convolution with bias and ReLU, as a network runs them):

* ``vgg16``: the 13-convolution stack of VGG-16 with its 2x2 max-pools, at uniform
  sparsity and (``--han``) at the per-layer profile of Han et al. (2015).
* ``cnn_non_static``: the sentence CNN (Kim, 2014): widths 3/4/5 x 100 maps over a
  56-word sentence of 300-d embeddings, max over time, a 300 -> 2 classifier.
* ``resnet50_1x1``: the 1x1 convolutions of ResNet-50's 16 bottleneck blocks
  (reduce + ReLU, expand, shortcut projection, residual add + ReLU). The 3x3
  convolutions are left out; in the projection blocks of groups 2-4 a stride-2
  subsample stands in for the strided 3x3. With ``--pattern=dlmc`` every layer
  takes its own DLMC pattern.

Dense and sparse share the same weights (the dense side runs the densified pruned
kernels through `lax.conv_general_dilated` at the mode's precision) and are checked
against each other. Reported: median time per jitted forward call, GPU kernel time
per call (sum over kernels, from a profiler trace), weight bytes, output agreement.

    python3 experiments/network.py                     # small CPU default
    python3 experiments/network.py --model=vgg16 --sparsity=0.8,0.9,0.95 \
        --modes=float32_highest,float32,bfloat16 --batch=1,32
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax
from tqdm import tqdm

from jaxsparse import benchmark as B

import common
import layers as L
import plots as P
import tables as T

common.define_flags("modes", "batch", "cnn_batch", "pattern", "repeats", "out", "scale", "seed", "progress",
                    "budget_s", "kernel_time", model=["all"], sparsity=[0.9],
                    choices={"model": L.MODELS + ("all",)})
flags.DEFINE_bool("han", True, "Also run VGG-16 at the Han et al. (2015) per-layer sparsity profile.")

FLAGS = flags.FLAGS

RELU_GAIN = math.sqrt(2.0)  # He gain: keeps activations of order one through ReLU layers


# ---- networks --------------------------------------------------------------------


@dataclasses.dataclass
class Net:
    name: str
    input_hw_c: tuple            # (H, W, C) of one example
    convs: list                  # [(Layer, relu)] in call order
    forward: Callable            # forward(conv, x, params) with conv(i, x) -> y
    extra_params: Callable | None = None   # seed -> dict of non-conv params (float32)


def _maxpool(x):
    init = jnp.array(-jnp.inf, x.dtype)
    return lax.reduce_window(x, init, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")


def vgg16_net(scale: float) -> Net:
    layers = [l.scaled(scale) for l in L.VGG16]
    blocks = (2, 2, 3, 3, 3)

    def forward(conv, x, params):
        i = 0
        for n in blocks:
            for _ in range(n):
                x = conv(i, x)
                i += 1
            x = _maxpool(x)
        return x

    return Net("vgg16", layers[0].in_hw + (3,), [(l, True) for l in layers], forward)


def cnn_net(scale: float) -> Net:
    layers = list(L.CNN_NON_STATIC)

    def forward(conv, x, params):
        feats = [jnp.max(conv(i, x), axis=(1, 2)) for i in range(len(layers))]
        h = jnp.concatenate(feats, axis=-1)
        w, b = params["fc"]
        return h @ w.astype(h.dtype) + b.astype(h.dtype)

    def extra(seed):
        rng = np.random.default_rng(seed + 11)
        n = L.FEATURE_MAPS * len(layers)
        return {"fc": (jnp.asarray(rng.standard_normal((n, 2)).astype(np.float32) / math.sqrt(n)),
                       jnp.zeros((2,), jnp.float32))}

    return Net("cnn_non_static", (1, L.SENTENCE_LENGTH, L.EMBEDDING), [(l, True) for l in layers],
               forward, extra)


def resnet50_1x1_net(scale: float) -> Net:
    convs = []
    hw = max(1, int(round(56 / scale)))
    cin = 64
    for g, nblocks in enumerate(L.RESNET50_BLOCKS, 1):
        c = 64 * 2 ** (g - 1)
        stride = 1 if g == 1 else 2
        out_hw = -(-hw // stride)
        for i in range(nblocks):
            names = L.resnet50_block_names(g, i)
            block_in = cin if i == 0 else 4 * c
            convs.append((L.Layer(f"r50.g{g}.b{i}.reduce", "resnet50_1x1", block_in, c, (1, 1), (hw, hw),
                                  dlmc=names["reduce"]), True))
            convs.append((L.Layer(f"r50.g{g}.b{i}.expand", "resnet50_1x1", c, 4 * c, (1, 1),
                                  (out_hw, out_hw), dlmc=names["expand"]), False))
            if i == 0:
                convs.append((L.Layer(f"r50.g{g}.b0.shortcut", "resnet50_1x1", block_in, 4 * c, (1, 1),
                                      (hw, hw), stride=stride, dlmc=names["shortcut"]), False))
            hw = out_hw
        cin = 4 * c

    def forward(conv, x, params):
        i = 0
        for g, nblocks in enumerate(L.RESNET50_BLOCKS, 1):
            for b in range(nblocks):
                h = conv(i, x)                       # reduce + bias + ReLU
                if b == 0 and g > 1:
                    h = h[:, ::2, ::2, :]            # stands in for the stride-2 3x3 convolution
                y = conv(i + 1, h)                   # expand + bias
                if b == 0:
                    x = conv(i + 2, x)               # shortcut projection + bias
                    i += 3
                else:
                    i += 2
                x = jax.nn.relu(y + x)
        return x

    return Net("resnet50_1x1", (int(round(56 / scale)),) * 2 + (64,), convs, forward)


NETS = {"vgg16": vgg16_net, "cnn_non_static": cnn_net, "resnet50_1x1": resnet50_1x1_net}


# ---- parameters ----------------------------------------------------------------------


def sparse_params(net: Net, label, pattern: str, seed: int) -> tuple[list, list]:
    """[(SparseFilter float32, bias)] per conv, and the pattern used per conv."""
    params, used = [], []
    for k, (layer, relu) in enumerate(net.convs):
        s = L.han_sparsity(layer.name) if label == "han" else float(label)
        filt, u = L.make_filter(layer, s, pattern, seed + k)
        if relu:
            filt = filt.with_data(filt.data * RELU_GAIN)
        bias = jnp.asarray(np.random.default_rng(seed + 100 + k).standard_normal(layer.cout)
                           .astype(np.float32) * 0.05)
        params.append((filt, bias))
        used.append(u)
    return params, used


def conv_fns(net: Net, mode: str):
    """(dense conv, sparse conv) closures conv(params)(i, x) for the forward."""
    prec = L.mode_precision(mode)

    def dense(params):
        def conv(i, x):
            layer, relu = net.convs[i]
            w, b = params["convs"][i]
            return L.dense_conv(x, w, layer, prec, bias=b, relu=relu)
        return conv

    def sparse(params):
        def conv(i, x):
            layer, relu = net.convs[i]
            f, b = params["convs"][i]
            return L.sparse_conv(x, f, layer, bias=b, relu=relu)
        return conv

    return dense, sparse


def cast_params(params: dict, dtype) -> dict:
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                  params)


# ---- run -------------------------------------------------------------------------------


@dataclasses.dataclass
class NetworkConfig:
    """The network run's flags (same names), resolved for this machine by `resolved`."""
    model: list = dataclasses.field(default_factory=lambda: ["all"])
    sparsity: list = dataclasses.field(default_factory=lambda: [0.9])
    modes: list = dataclasses.field(default_factory=lambda: ["float32"])
    batch: list = dataclasses.field(default_factory=lambda: [1])
    cnn_batch: list = dataclasses.field(default_factory=lambda: [50])
    pattern: str = "magnitude"
    han: bool = True
    repeats: int = 0
    out: str = ""
    scale: float = 0.0
    seed: int = 0
    kernel_time: str = "all"
    progress: bool = True
    budget_s: float = 0.0

    def resolved(self) -> "NetworkConfig":
        c = dataclasses.replace(self)
        c.scale = common.auto_scale(c.scale, cpu_default=8.0)
        c.repeats = common.auto_repeats(c.repeats)
        c.out = c.out or common.default_out("network")
        c.modes = L.check_modes(c.modes)
        if "all" in c.model:
            c.model = list(L.MODELS)
        return c


def config_from_flags() -> NetworkConfig:
    return NetworkConfig(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(NetworkConfig)})


def _labels(net: Net, cfg: NetworkConfig) -> list:
    labels = [f"{s:g}" for s in cfg.sparsity]
    if cfg.han and net.name == "vgg16":
        labels.append("han")
    return labels


def _batches(net: Net, cfg: NetworkConfig) -> list[int]:
    bs = list(cfg.batch)
    if net.name == "cnn_non_static":
        bs += [b for b in cfg.cnn_batch if b not in bs]
    return bs


def run_network(cfg: NetworkConfig) -> dict:
    cfg = cfg.resolved()
    common.check_backend()
    start = time.time()
    env = B.environment()
    kernel = B.gpu_present() and cfg.kernel_time != "none"
    nets = [NETS[m](cfg.scale) for m in cfg.model]
    total = sum(len(_batches(n, cfg)) * len(cfg.modes) * (1 + len(_labels(n, cfg))) for n in nets)
    bar = tqdm(total=total, disable=not cfg.progress, desc="network", unit="run", dynamic_ncols=True)
    rows, profiles, skipped = [], {}, []
    for net in nets:
        labels = _labels(net, cfg)
        extra = net.extra_params(cfg.seed) if net.extra_params else {}
        sp = {lab: sparse_params(net, lab, cfg.pattern, cfg.seed) for lab in labels}
        dense32 = {}
        profiles[net.name] = {lab: [{"layer": l.name, "sparsity": round(f.sparsity, 4), "nnz": f.nnz,
                                     "pattern": u}
                                    for (l, _), (f, _), u in zip(net.convs, sp[lab][0], sp[lab][1])]
                              for lab in labels}
        for batch in _batches(net, cfg):
            if cfg.budget_s and time.time() - start > cfg.budget_s:
                skipped.append(f"{net.name} b{batch}")
                continue
            x32 = B.random_input((batch,) + tuple(net.input_hw_c), jnp.float32, cfg.seed)
            for mode in cfg.modes:
                dt = L.mode_dtype(mode)
                x = x32.astype(dt)
                dense_conv, sparse_conv = conv_fns(net, mode)
                dense_fn = jax.jit(lambda x, p: net.forward(dense_conv(p), x, p))
                sparse_fn = jax.jit(lambda x, p: net.forward(sparse_conv(p), x, p))

                def dense_params(lab):
                    if lab not in dense32:
                        dense32[lab] = [(L.to_dense(f), b) for f, b in sp[lab][0]]
                    return cast_params({"convs": dense32[lab], **extra}, dt)

                bar.set_postfix_str(f"{net.name} b{batch} dense {mode}")
                dp = dense_params(labels[0])
                dense_us = B.median_call_us(dense_fn, x, dp, repeats=cfg.repeats)
                dk = B.kernel_time_us(dense_fn, x, dp) if kernel else None
                bar.update(1)
                for lab in labels:
                    bar.set_postfix_str(f"{net.name} b{batch} sparse {mode} {lab}")
                    spp = cast_params({"convs": sp[lab][0], **extra}, dt)
                    sparse_us = B.median_call_us(sparse_fn, x, spp, repeats=cfg.repeats)
                    sk = B.kernel_time_us(sparse_fn, x, spp) if kernel else None
                    y_s = np.asarray(sparse_fn(x, spp), np.float32)
                    y_d = np.asarray(dense_fn(x, dp if lab == labels[0] else dense_params(lab)), np.float32)
                    scale = float(np.max(np.abs(y_d))) or 1.0
                    filters = [f for f, _ in sp[lab][0]]
                    itemsize = jnp.dtype(dt).itemsize
                    wb = [L.weight_bytes(l, f.nnz, itemsize) for (l, _), f in zip(net.convs, filters)]
                    nnz = sum(f.nnz for f in filters)
                    dense_w = sum(l.dense_weights for l, _ in net.convs)
                    rows.append({
                        "model": net.name, "batch": batch, "mode": mode, "dtype": L.MODES[mode][0],
                        "dense_precision": L.MODES[mode][1], "sparsity": lab,
                        "pattern": ",".join(sorted(set(sp[lab][1]))), "convs": len(net.convs),
                        "nnz": nnz, "overall_sparsity": 1 - nnz / dense_w,
                        "weight_bytes_dense": sum(a for a, _ in wb), "weight_bytes_sparse": sum(b for _, b in wb),
                        "dense_ms": dense_us / 1e3, "sparse_ms": sparse_us / 1e3,
                        "speedup": T.ratio(dense_us, sparse_us),
                        "dense_kernel_us": dk["total_us"] if dk else None,
                        "sparse_kernel_us": sk["total_us"] if sk else None,
                        "kernel_speedup": T.ratio(dk["total_us"] if dk else None, sk["total_us"] if sk else None),
                        "dense_launches": dk["launches"] if dk else None,
                        "sparse_launches": sk["launches"] if sk else None,
                        "finite": bool(np.all(np.isfinite(y_s)) and np.all(np.isfinite(y_d))),
                        "max_rel_err": float(np.max(np.abs(y_s - y_d)) / scale),
                        "out_rms": float(np.sqrt(np.mean(y_s.astype(np.float64) ** 2))),
                    })
                    bar.update(1)
    bar.close()
    return common.envelope("network", dataclasses.asdict(cfg), rows, start, skipped, env,
                           reduced_precision=T.reduced_precision_table(rows, *T.NETWORK_RP_KEYS),
                           sparsity_profiles=profiles, han2015_vgg16_density=L.HAN2015_VGG16_DENSITY)


TABLE = [("model", "network", ""), ("batch", "N", ""), ("mode", "mode", ""), ("sparsity", "sparsity", ""),
         ("overall_sparsity", "overall", ".3f"), ("dense_ms", "dense ms", ".3f"),
         ("sparse_ms", "sparse ms", ".3f"), ("speedup", "speedup", ".2f"),
         ("dense_kernel_us", "dn kern µs", ".1f"), ("sparse_kernel_us", "sp kern µs", ".1f"),
         ("kernel_speedup", "kern speedup", ".2f"), ("weight_mb_dense", "dense MB", ".2f"),
         ("weight_mb_sparse", "sparse MB", ".2f"), ("max_rel_err", "max rel err", ".1e")]


def report(result: dict) -> str:
    env, cfg = result["environment"], result["flags"]
    plat = env["platform"].upper()
    rows = [{**r, "weight_mb_dense": r["weight_bytes_dense"] / 1e6, "weight_mb_sparse": r["weight_bytes_sparse"] / 1e6}
            for r in result["rows"]]
    lines = [f"jaxsparse whole-network run on {env['device']} ({env['platform']}), jax {env['jax']}, "
             f"{env['date']}; spatial scale 1/{cfg['scale']:g}, pattern {cfg['pattern']}",
             f"median ms per jitted forward: sparse = jaxsparse {plat} kernels, dense = XLA {plat} "
             "convolutions (same weights, bias + ReLU); 'han' = Han et al. 2015 per-layer VGG-16 profile",
             "", T.format_table(rows, TABLE)]
    if result["reduced_precision"]:
        lines += ["", "reduced precision: gain = time at float32 / time at bf16/f16 (>1 = faster)",
                  T.format_table(result["reduced_precision"],
                                 [("model", "network", ""), ("batch", "N", ""), ("sparsity", "sparsity", ""),
                                  ("low_mode", "low", ""), ("ref_mode", "ref", ""),
                                  ("dense_gain", "dense gain", ".2f"), ("sparse_gain", "sparse gain", ".2f"),
                                  ("speedup_ref", "speedup ref", ".2f"), ("speedup_low", "speedup low", ".2f")])]
    if result.get("skipped"):
        lines += ["", "skipped (time budget): " + ", ".join(result["skipped"])]
    lines += ["", f"wall time {result['elapsed_s']:.0f} s"]
    return "\n".join(lines)


def write_outputs(result: dict, out: str) -> list[str]:
    meta = {"environment": result["environment"], "flags": result["flags"]}

    def path(name):
        return common.output_path(out, name)

    paths = [common.write_result(result, path("network.json")),
             T.write_csv(result["rows"], path("network.csv"), meta)]
    if result["reduced_precision"]:
        paths.append(T.write_csv(result["reduced_precision"], path("network_reduced_precision.csv"), meta))
    return paths + P.network_figures(result, os.path.dirname(path("network.csv")))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = run_network(config_from_flags())
    print(report(result))
    paths = write_outputs(result, result["flags"]["out"])
    print("\nwrote " + ", ".join(paths))


if __name__ == "__main__":
    app.run(main)
