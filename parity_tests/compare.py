"""qvl_jax against qvl_torch on the same HF directory: the numerical contract (docs/architecture.md).

Float32 ("highest" matmul precision): end to end (image features, last hidden
state, logits, loss) <= 1e-4 relative L2; gradients per parameter tensor
<= 1e-4; parameters after 3 AdamW steps <= 1e-4; AdamW's updates on the same
gradients <= 1e-4 (any dtype: float32 optimizers). bfloat16: each side against
the float32 torch result; the JAX error may be at most max(1.5 x the torch
error, 1e-2).

In bfloat16 each error is one random draw of rounding noise, and the ratio of
two draws is only as steady as the quantity is large: the logits of two images
and five labels are ten numbers, a bias gradient a few dozen. Measured on tiny
checkpoints, both sides' errors are of the same size (JAX's median ~0.9x) but
single-draw ratios on such quantities reach 2x either way. So bfloat16 runs on
batches of 8 images, and each gradient tensor is taken on the three optimizer
batches and compared stacked (three independent draws): the same limit, on a
quantity large enough for the ratio to mean something.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import numpy as np

FP32_LIMIT = 1e-4
BF16_RATIO, BF16_FLOOR = 1.5, 1e-2
# Adam's first steps move each element by ~lr * g / (|g| + eps): a sign step wherever |g| >> eps, and
# near g = 0 the map amplifies gradient noise by lr / eps. Some gradients are zero up to roundoff
# (k_proj.bias and the k third of the vision qkv.bias: softmax is shift-invariant), so with torch's
# eps = 1e-8 the comparison would measure noise amplification, not the optimizer: each such element
# jumps by a random +-lr. eps is therefore set above each dtype's gradient noise, the same value on
# both sides. bfloat16: noise ~5e-5 median, up to ~5e-4 (tiny checkpoints). float32: up to 3e-8 on the
# k_proj.bias of a decoder of width 64; there eps = 1e-6 let torch's own eager and sdpa attention
# disagree by 1.6e-4 after 3 steps (JAX vs sdpa 2.3e-4), over the 1e-4 limit; with 1e-5, 1.9e-5 (JAX 2.4e-5).
ADAMW = dict(lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.01)
ADAMW_EPS = {"float32": 1e-5, "bfloat16": 1e-3, "float16": 1e-3}
DEFAULT_EPS = 1e-8  # the trainers' (training.adam_epsilon), checked on shared gradients


@dataclasses.dataclass
class Result:
    rel_l2: float
    limit: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.rel_l2) and self.rel_l2 <= self.limit)

    def to_json(self) -> dict:
        return {"rel_l2": self.rel_l2, "limit": self.limit, "ok": self.ok}


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64 (absolute when b is all zeros)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    den = np.linalg.norm(b)
    num = np.linalg.norm(a - b)
    return float(num / den) if den > 0 else float(num)


def param_sizes(checkpoint) -> dict[str, int]:
    """Element count of every tensor in a checkpoint, by canonical HF key."""
    from safetensors import safe_open

    from qvl_core.hf_checkpoint import weight_files
    from qvl_jax import param_map
    out = {}
    for f in weight_files(checkpoint):
        with safe_open(f, framework="np") as st:
            for k in st.keys():
                out[param_map.canonical_hf_key(k)] = int(np.prod(st.get_slice(k).get_shape()))
    return out


def image_batches(image_sizes: Sequence[tuple[int, int]], seed: int, patch: int = 14, batch: int = 2):
    """One batch of `batch` same-size images per size, then one batch cycling through all sizes."""
    from parity_tests.tiny import random_batch
    out = []
    for i, (h, w) in enumerate(image_sizes):
        grids = [(1, h // patch, w // patch)] * batch
        out.append((f"{h}x{w}", *random_batch(grids, seed=seed + i)))
    if len(image_sizes) > 1:
        sizes = [image_sizes[i % len(image_sizes)] for i in range(max(batch, len(image_sizes)))]
        grids = [(1, h // patch, w // patch) for h, w in sizes]
        out.append(("mixed", *random_batch(grids, seed=seed + 100)))
    return out


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        h, _, w = item.strip().partition("x")
        sizes.append((int(h), int(w)))
    return sizes


class Sides:
    """The JAX model and the torch model(s) for one checkpoint and dtype."""

    def __init__(self, checkpoint, *, dtype: str, mode: str | None, num_labels: int | None, head_seed: int = 0):
        import jax
        import torch

        import qvl_jax
        import qvl_torch

        jax.config.update("jax_default_matmul_precision", "highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = dtype
        kw = dict(mode=mode, num_labels=num_labels, head_seed=head_seed)
        self.jax = qvl_jax.load_hf(checkpoint, dtype=dtype, **kw)
        # For the optimizer comparison: float32 master weights computing in `dtype`.
        self.jax_master = qvl_jax.load_hf(checkpoint, dtype="float32", compute_dtype=dtype, **kw)
        self.config = self.jax.config
        if self.config.head.num_labels is None:
            raise ValueError(f"{checkpoint} has no stored head: pass num_labels")
        self.torch = qvl_torch.load_pretrained(checkpoint, dtype=dtype, **kw).to(self.device)
        self.torch_ref = (self.torch if dtype == "float32" else
                          qvl_torch.load_pretrained(checkpoint, dtype="float32", **kw).to(self.device))

    # ----------------------------------------------------------------- forward
    def forward_jax(self, pix, grids):
        import jax.numpy as jnp
        grids_t = tuple(map(tuple, np.asarray(grids).tolist()))
        feats, out = _forward(grids_t)(self.jax, jnp.asarray(pix))
        return {"image_features": np.asarray(feats, np.float32), "last_hidden_state":
                np.asarray(out.last_hidden_state, np.float32), "logits": np.asarray(out.logits, np.float32)}

    def forward_torch(self, model, pix, grids):
        import torch
        with torch.no_grad():
            x = torch.from_numpy(pix).to(self.device)
            out = model(x, grids)
            feats = _torch_image_features(model, x, grids)
        return {"image_features": feats, "last_hidden_state": out.last_hidden_state.float().cpu().numpy(),
                "logits": out.logits.float().cpu().numpy()}

    # ------------------------------------------------------------------- grads
    def loss_and_grads_jax(self, model, pix, grids, labels):
        from qvl_jax import param_map
        loss, grads = _grads_state(model, pix, grids, labels)
        return float(loss), _jax_to_hf_named(grads, self.config, param_map)

    def loss_and_grads_torch(self, model, pix, grids, labels):
        import torch
        model.zero_grad(set_to_none=True)
        x = torch.from_numpy(pix).to(self.device)
        logits = model(x, grids).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.from_numpy(labels).long().to(self.device))
        loss.backward()
        return float(loss.detach()), _torch_named(model, lambda p: p.grad)


def _torch_image_features(model, x, grids):
    """The vision tower's merged features, padded like qvl_jax's `[B, N/4, out_hidden]`."""
    import torch
    grid = torch.as_tensor(np.asarray(grids), dtype=torch.long)
    counts = grid.prod(-1).tolist()
    packed = torch.cat([x[b, :n] for b, n in enumerate(counts)])
    visual = model.model.visual
    feats = visual(packed.to(visual.dtype), grid_thw=grid).pooler_output.float()
    merge = model.config.vision.merge_unit
    per = torch.split(feats, [c // merge for c in counts])
    return torch.nn.utils.rnn.pad_sequence(list(per), batch_first=True).cpu().numpy()


def _torch_named(model, get) -> dict[str, np.ndarray]:
    from qvl_jax import param_map
    out = {}
    for name, p in model.named_parameters():
        key = param_map.canonical_hf_key(name[len("model."):] if name.startswith("model.") else name)
        value = get(p)
        if value is not None:
            out[key] = value.detach().float().cpu().numpy()
    return out


def _jax_to_hf_named(state, cfg, param_map) -> dict[str, np.ndarray]:
    from flax import nnx
    v = cfg.vision
    patch = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out = {}
    for path, var in nnx.to_flat_state(state):
        key, kind = param_map.jax_to_hf(".".join(map(str, path)))
        arr = np.asarray(var.get_value(), np.float32)
        out[key] = param_map.to_hf(kind, arr, (arr.shape[-1], *patch) if kind == "patch_conv" else None)
    return out


def default_batch(dtype: str) -> int:
    """Images per compared batch: 2 suffice in float32 (errors ~1e-6, limit 1e-4); bfloat16 needs 8 (see above)."""
    return 2 if dtype == "float32" else 8


def run(checkpoint: str | os.PathLike, *, dtype: str = "float32", image_sizes=((140, 252), (56, 56)),
        mode: str | None = None, num_labels: int | None = None, seed: int = 0, train: bool = True,
        batch: int | None = None, sides: Sides | None = None) -> dict[str, Result]:
    """All comparisons for one checkpoint; returns `{quantity: Result}`."""
    batch = batch or default_batch(dtype)
    sides = sides or Sides(checkpoint, dtype=dtype, mode=mode, num_labels=num_labels)
    cfg = sides.config
    rng = np.random.default_rng(seed)
    results: dict[str, Result] = {}

    def record(name: str, jax_val, torch_val, ref_val):
        if dtype == "float32":
            results[name] = Result(rel_l2(jax_val, ref_val), FP32_LIMIT)
        else:
            torch_err = rel_l2(torch_val, ref_val)
            results[name] = Result(rel_l2(jax_val, ref_val), max(BF16_RATIO * torch_err, BF16_FLOOR))

    batches = image_batches(list(image_sizes), seed, batch=batch)
    for tag, pix, grids in batches:
        j = sides.forward_jax(pix, grids)
        t = sides.forward_torch(sides.torch, pix, grids)
        r = t if sides.torch_ref is sides.torch else sides.forward_torch(sides.torch_ref, pix, grids)
        keys = ["image_features", "logits"] + (["last_hidden_state"] if cfg.head.mode == "vlm" else [])
        for k in keys:
            jv, tv, rv = j[k], t[k], r[k]
            if k == "last_hidden_state":  # padded positions of shorter rows are not outputs
                mask = _valid_positions(cfg, grids)
                jv, tv, rv = jv[mask], tv[mask], rv[mask]
            record(f"{k}@{tag}", jv, tv, rv)
    if not train:
        return results

    # Loss and gradients on three batches (the first, then two more of the first size), each
    # quantity stacked over the three; then 3 AdamW steps on the same three batches.
    tag, pix, grids = batches[0]
    steps = [(pix, grids, rng.integers(0, cfg.head.num_labels, size=len(grids)))]
    for s in range(2):
        more = image_batches([image_sizes[0]], seed + 10 + s, batch=batch)[0][1:]
        steps.append((*more, rng.integers(0, cfg.head.num_labels, size=len(grids))))
    per_side = []
    for side, model in (("jax", sides.jax), ("torch", sides.torch), ("ref", sides.torch_ref)):
        if side == "ref" and sides.torch_ref is sides.torch:
            per_side.append(per_side[-1])
            continue
        get = sides.loss_and_grads_jax if side == "jax" else sides.loss_and_grads_torch
        runs = [get(model, *step) for step in steps]
        per_side.append(([loss for loss, _ in runs], {k: np.stack([g[k] for _, g in runs]) for k in runs[0][1]}))
    (jl, jg), (tl, tg), (rl, rg) = per_side
    record(f"loss@{tag}", jl, tl, rl)
    for key in sorted(rg):
        record(f"grad/{key}", jg[key], tg[key], rg[key])
    jp = adamw_jax(sides, steps)
    tp = adamw_torch(sides, sides.torch, steps)
    rp = tp if sides.torch_ref is sides.torch else adamw_torch(sides, sides.torch_ref, steps)
    for key in sorted(rp):
        record(f"adamw3/{key}", jp[key], tp[key], rp[key])
    results.update(optimizer_results(_torch_named(sides.torch_ref, lambda p: p), rg, dtype))
    return results


def optimizer_results(params: dict[str, np.ndarray], grads: dict[str, np.ndarray], dtype: str) -> dict[str, Result]:
    """AdamW's updates, JAX against torch on the same gradients, at the comparison's and the trainers' epsilon.
    The limit is float32's whatever the model's dtype: both optimizers keep float32 (or wider) master weights."""
    results = {}
    for eps, tag in ((ADAMW_EPS[dtype], "adamw_update"), (DEFAULT_EPS, "adamw_update_eps1e-8")):
        ju, tu = adamw_updates(params, grads, eps)
        for key in sorted(tu):
            results[f"{tag}/{key}"] = Result(rel_l2(ju[key], tu[key]), FP32_LIMIT)
    return results


def _valid_positions(cfg, grids) -> np.ndarray:
    from qvl_core.sequence import build_input_ids
    _, mask = build_input_ids(cfg, grids)
    return mask.astype(bool)


def adamw_jax(sides: Sides, steps) -> dict[str, np.ndarray]:
    from flax import nnx

    from qvl_jax import param_map
    model = nnx.clone(sides.jax_master)  # the Sides stay untouched, so they can be reused
    opt = nnx.Optimizer(model, _jax_adamw(ADAMW_EPS[sides.dtype]), wrt=nnx.Param)
    update = nnx.jit(lambda opt, model, grads: opt.update(model, grads))  # one compile, not one per op and shape
    for pix, grids, labels in steps:
        _, grads = _grads_state(model, pix, grids, labels)
        update(opt, model, grads)
    return _jax_to_hf_named(nnx.state(model, nnx.Param), sides.config, param_map)


def _grads_state(model, pix, grids, labels):
    import jax.numpy as jnp
    grids_t = tuple(map(tuple, np.asarray(grids).tolist()))
    return _loss_and_grads(grids_t)(model, jnp.asarray(pix), jnp.asarray(labels))


@functools.lru_cache(maxsize=None)
def _forward(grids_t):
    from flax import nnx
    return nnx.jit(lambda m, p: (m.encode_image(p, grids_t), m(p, grids_t)))


@functools.lru_cache(maxsize=None)
def _loss_and_grads(grids_t):
    """The jitted loss and gradients for one batch geometry: the three batches of a comparison share it."""
    import optax
    from flax import nnx

    def loss_fn(m, pix, labels):
        return optax.softmax_cross_entropy_with_integer_labels(m(pix, grids_t).logits, labels).mean()

    return nnx.jit(nnx.value_and_grad(loss_fn))


def adamw_torch(sides: Sides, model, steps) -> dict[str, np.ndarray]:
    """AdamW on float32 master weights; forward and backward in the model's dtype (DeepSpeed's bf16 scheme)."""
    import copy

    import torch
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(master, lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW_EPS[sides.dtype],
                            weight_decay=ADAMW["weight_decay"])
    for pix, grids, labels in steps:
        sides.loss_and_grads_torch(model, pix, grids, labels)
        for p, m in zip(params, master):
            m.grad = p.grad.float()
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
    return _named_master(model, master)


def adamw_updates(params: dict[str, np.ndarray], grads: dict[str, np.ndarray], eps: float):
    """optax's and torch's AdamW from the same `params`, fed the same gradients (`grads[key]`: `[steps, ...]`):
    each side's updates summed over the steps, in float64 (JAX: the updates optax returns, before they are added
    to a float32 parameter; torch: float64 master weights, after - before)."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch

    tx = _jax_adamw(eps)

    @jax.jit
    def jax_step(grads, state, p):
        updates, state = tx.update(grads, state, p)
        return updates, state, optax.apply_updates(p, updates)

    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state, jax_total = tx.init(p), {k: np.zeros(v.shape) for k, v in params.items()}
    master = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW(list(master.values()), lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]), eps=eps,
                            weight_decay=ADAMW["weight_decay"])
    for step in range(len(next(iter(grads.values())))):
        updates, state, p = jax_step({k: jnp.asarray(grads[k][step]) for k in p}, state, p)
        jax_total = {k: jax_total[k] + np.asarray(updates[k], np.float64) for k in p}
        for k, m in master.items():
            m.grad = torch.from_numpy(np.asarray(grads[k][step], np.float64))
        opt.step()
    return jax_total, {k: m.detach().numpy() - params[k].astype(np.float64) for k, m in master.items()}


def _jax_adamw(eps: float):
    import optax
    return optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=eps, weight_decay=ADAMW["weight_decay"])


def _named_master(model, master) -> dict[str, np.ndarray]:
    from qvl_jax import param_map
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {param_map.canonical_hf_key(n[len("model."):] if n.startswith("model.") else n):
            m.detach().cpu().numpy() for n, m in zip(names, master)}
