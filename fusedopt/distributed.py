"""Optimizer state sharded across data-parallel ranks (ZeRO stage 1/2) on torch.distributed.

    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    sharded = ShardedOptimizer(fusedopt.Adam(1e-3, global_clipnorm=1.0), params)
    ...                        # forward/backward into this rank's `grads`
    sharded.apply(grads)       # reduce-scatter (mean), update the shard, all-gather

Every rank holds the whole parameter buffer (a FlatBuffer, identical on every rank)
and the optimizer state only for its contiguous shard `params.data[lo:hi]`: state
memory / world size. A step is

    reduce-scatter (sum, then / world size) of the flat grads into this rank's shard
    -> whole-model reductions (one small all-gather: per-segment or global sums of
       squares and the non-finite flag) -> unscale and norm-clip factor on the shard
    -> the fused update of the shard (a fusedopt optimizer on a FlatBuffer view of
       it: clipvalue, weight decay, the rule, the step counters)
    -> all-gather of the params (each rank broadcasts its shard).

Why a wrapper and not an option on every optimizer: the sharded step needs a process
group, a shard, scratch buffers and collectives, none of which a single-process
optimizer should know about (ARCHITECTURE.md, principle 10: lower floors never import
upper ones). The wrapper takes a configured optimizer, so every rule and option is
available unchanged, and builds the shard's optimizer from its config.

How the whole-model quantities reach the shard's update without a second pipeline:
the shard's optimizer is the user's one with `loss_scale_factor`, `clipnorm` and
`global_clipnorm` removed, and this module multiplies the shard's gradient by
1/loss_scale_factor and then by the norm-clip factor, in the storage dtype, before
the update: exactly the two multiplications the kernels' prologue (fused_element in
kernels/common.cuh) and the NumPy executor make first, in the same order, so the
rule sees the same gradient bits. Everything after (clip by value, weight decay,
the rule, iterations) stays in the executors. The factors are computed with the same
float64 formulas as fusedopt.reference's, on the array module of the buffers (CuPy
on a GPU: no host read in the step). skip_nonfinite: when any rank's gradient holds
inf or NaN, the factor is NaN on every rank; the shard's optimizer (skip_nonfinite
on) then sees a non-finite gradient and skips and counts the step itself, on the
device, on every rank together.

Collectives have the timeout given to init_process_group: pass one there.
NCCL (CuPy buffers through DLPack) is written but untested here (no GPU).
"""

import json
import os

import numpy as np

from . import checkpoint, cuda, reference
from .flat import FlatBuffer, Layout
from .optimizer import FusedOptimizer, _lookup

# Rules whose update needs a whole variable (`whole_variable`: a trust ratio over the
# variable, factored second moments, an orthogonalised matrix) would shard at segment
# boundaries (each rank owns whole segments, so its update sees whole variables; shards
# then are only as even as the segments allow) or gather each straddling segment before
# its update. Neither is built yet: they are refused. So are gradient accumulation (its
# mean must come before the clipping done here, across ranks), EMA and the
# LossScaleOptimizer wrapper, which the sharded step does not carry yet.

# Options applied here, across ranks, instead of by the shard's optimizer.
_WHOLE_MODEL_OPTIONS = ("loss_scale_factor", "clipnorm", "global_clipnorm")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fusedopt-sharded-checkpoint"


def _dist():
    import torch.distributed as dist  # lazily: `import fusedopt` never imports torch

    return dist


def shard_bounds(size, world_size):
    """[lo, hi) of each rank's shard: contiguous, sizes differing by at most one."""
    return [(size * r // world_size, size * (r + 1) // world_size) for r in range(world_size)]


def shard_pieces(offsets, lo, hi):
    """(segment index, start, stop) of every non-empty part of a segment inside
    [lo, hi), positions relative to the whole buffer: the shard's segment table, cut
    at the shard boundaries."""
    pieces = []
    for s, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        start, stop = max(a, lo), min(b, hi)
        if start < stop:
            pieces.append((s, start, stop))
    return pieces


class ShardedOptimizer:
    """`opt` applied data-parallel to `params`, its state sharded across `group`.

    Args:
        opt: a fusedopt optimizer, not yet built (it has taken no step); its
            hyperparameters are read once, here. It is not used for steps itself.
        params: the FlatBuffer every rank holds (same layout and dtype on every rank,
            checked here); updated in place by apply().
        group: a torch.distributed process group, or None for the default group,
            which must be initialised.
    Every rank must construct it, with the same arguments: construction runs
    collectives (the cross-rank checks).
    """

    def __init__(self, opt, params, group=None):
        dist = _dist()
        if not isinstance(opt, FusedOptimizer):
            raise TypeError(f"`opt` must be a fusedopt optimizer, got {type(opt).__name__}")
        if opt.whole_variable:
            raise ValueError(
                f"`opt`: {type(opt).__name__} updates whole variables; sharding it (at "
                "segment boundaries, or by gathering each straddling variable) is not "
                "implemented")
        if opt.rule is None:  # a wrapper: LossScaleOptimizer
            raise ValueError(f"`opt`: a {type(opt).__name__} cannot be sharded yet; shard "
                             "the optimizer it wraps instead")
        for option in ("use_ema", "gradient_accumulation_steps"):
            if getattr(opt, option):
                raise ValueError(f"`opt`: `{option}` is not supported by ShardedOptimizer yet")
        if opt.built or opt.iterations:
            raise ValueError("`opt` already has state; pass a new optimizer and restore "
                             "state with ShardedOptimizer.load()")
        if not isinstance(params, FlatBuffer):
            raise TypeError(f"`params` must be a FlatBuffer, got {type(params).__name__}")
        for option in ("master_weights", "state_dtype", "stochastic_rounding"):
            if getattr(opt, option):
                raise ValueError(f"`opt`: `{option}` (mixed precision) is not supported by "
                                 "ShardedOptimizer yet")
        if params.dtype.name not in ("float32", "float64"):
            raise ValueError(f"`params`: {params.dtype.name} buffers (mixed precision) are not "
                             "supported by ShardedOptimizer yet; use float32 or float64")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("`group`: torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group() first")
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"`group` must be a ProcessGroup or None, got {type(group).__name__}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.params = params
        config = opt.get_config()
        if callable(config["learning_rate"]):
            raise ValueError("`opt`: a callable learning_rate cannot be checked to agree "
                             "across ranks; use a number or a fusedopt.schedules schedule")
        _agree(self, "layout, dtype, device kind and optimizer config", {
            "layout": params.layout.to_dict(), "device": params.device.split(":")[0],
            "optimizer": type(opt).__name__, "config": config})
        if params.size < self.world_size:
            raise ValueError(f"`params` hold {params.size} elements, fewer than the "
                             f"{self.world_size} ranks: every rank needs a non-empty shard")
        self.outer = opt
        # The options applied across ranks, fixed here: the shard's optimizer (`inner`)
        # has them off, and `opt` is not read again.
        self._options = {n: getattr(opt, n) for n in _WHOLE_MODEL_OPTIONS}
        self._options["skip_nonfinite"] = opt.skip_nonfinite
        self.bounds = shard_bounds(params.size, self.world_size)
        self.lo, self.hi = self.bounds[self.rank]
        self.pieces = shard_pieces(params.offsets, self.lo, self.hi)
        self.shard = FlatBuffer(params.data[self.lo:self.hi],
                                [(b - a,) for _, a, b in self.pieces])
        self.inner = _shard_optimizer(opt)
        self.inner.build(self.shard)
        with cuda.on_device(params.device):
            self._grad = params.xp.empty(self.hi - self.lo, dtype=params.dtype)
        self._t_params = _tensor(params.data)
        self._t_grad = _tensor(self._grad)

    # ------------------------------------------------------------------ properties
    @property
    def iterations(self):
        return self.inner.iterations

    @property
    def skipped_steps(self):
        return self.inner.skipped_steps

    @property
    def last_step_skipped(self):
        return self.inner.last_step_skipped

    @property
    def state_nbytes(self):
        """Bytes of optimizer state this rank holds (about the total / world size)."""
        return sum(int(s.nbytes) for s in self.inner.slots().values())

    # ----------------------------------------------------------------------- step
    def apply(self, grads, reduced=False):
        """One data-parallel step from this rank's `grads` (a FlatBuffer of params'
        layout, or a 1-D array of its size, dtype and device), on every rank.

        reduced=False: `grads` are this rank's own; their mean over the ranks is taken
        (reduce-scatter). reduced=True: `grads` are already the same mean on every
        rank (e.g. all-reduced by the caller); only this rank's shard of them is read.
        `grads` are never written.
        """
        g = self.outer._check_grads(grads, self.params)
        if not isinstance(reduced, bool):
            raise TypeError(f"`reduced` must be a bool, got {type(reduced).__name__}")
        with cuda.on_device(self.params.device):  # this rank's GPU, not CuPy's default
            shard = self._reduce_scatter(g) if not reduced else g[self.lo:self.hi]
            shard = self._prologue(shard)
            self.inner.apply(shard, self.shard)
            self._all_gather()

    def _reduce_scatter(self, g):
        dist = _dist()
        t = _tensor(g)
        dist.reduce_scatter(self._t_grad, [t[a:b] for a, b in self.bounds], group=self.group)
        # The mean as sum / N in the storage dtype (no AVG on gloo); a single process
        # taking sum / N of the same sum gets the same bits.
        self.params.xp.divide(self._grad, self.world_size, out=self._grad)
        return self._grad

    def _prologue(self, g):
        """The shard's gradient unscaled and norm-clipped with factors of the whole
        model, or NaN everywhere (skip_nonfinite) when any rank's is not finite."""
        opt = self._options
        if not any(opt.values()):
            return g
        dt = self.params.dtype.type
        unscale = dt(1.0 / opt["loss_scale_factor"]) if opt["loss_scale_factor"] else None
        if g is not self._grad:  # already-reduced grads belong to the caller
            self._grad[...] = g
            g = self._grad
        factors = self._factors(g, unscale)  # one per segment, float64, on the device
        if unscale is not None:
            g *= unscale
        if factors is not None:
            if opt["clipnorm"]:
                for s, a, b in self.pieces:
                    g[a - self.lo:b - self.lo] *= factors[s].astype(dt)
            else:
                g *= factors[0].astype(dt)
        return g

    def _factors(self, g, unscale):
        """Per segment (clipnorm) or one (otherwise) float64 factor on the device, from
        sums of squares and the non-finite flag of every rank; None if none applies."""
        opt, xp = self._options, self.params.xp
        clipnorm, global_clipnorm = opt["clipnorm"], opt["global_clipnorm"]
        nseg = len(self.params) if clipnorm else 1
        local = xp.zeros(nseg + 1, dtype=np.float64)
        if clipnorm:
            for s, a, b in self.pieces:
                local[s] = _sum_of_squares(xp, g[a - self.lo:b - self.lo], unscale)
        elif global_clipnorm:
            local[0] = _sum_of_squares(xp, g, unscale)
        if opt["skip_nonfinite"]:
            local[nseg] = ~xp.isfinite(g).all()
        if not (clipnorm or global_clipnorm or opt["skip_nonfinite"]):
            return None  # loss_scale_factor alone needs nothing from other ranks
        total = self._sum_over_ranks(local)
        sums, bad = total[:nseg], total[nseg] > 0
        if clipnorm:
            factors = clipnorm_factors(xp, sums, clipnorm)
        elif global_clipnorm:
            factors = global_clipnorm_factors(xp, sums, global_clipnorm)
        else:
            factors = xp.ones(1, dtype=np.float64)
        if opt["skip_nonfinite"]:
            factors = xp.where(bad, np.nan, factors)
        return factors

    def _sum_over_ranks(self, local):
        """Sum of `local` over the ranks, added in rank order on every rank (an
        all-gather, not an all-reduce, so the order is fixed and the same everywhere)."""
        dist = _dist()
        t = _tensor(local)
        parts = [t.new_empty(t.shape) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.group)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return _from_tensor(total, self.params.xp)

    def _all_gather(self):
        # Uneven shards: gloo's all_gather wants equal sizes, so each rank broadcasts
        # its shard straight into everyone's params (same bytes on the wire, no copy).
        dist = _dist()
        for r, (a, b) in enumerate(self.bounds):
            src = r if self.group is None else dist.get_global_rank(self.group, r)
            dist.broadcast(self._t_params[a:b], src=src, group=self.group)

    # ----------------------------------------------------------------- checkpoints
    def save(self, directory):
        """Write this rank's shard (params and state, fusedopt.checkpoint's atomic
        writer) into `directory`, then rank 0 writes the manifest: every rank calls it."""
        directory = os.fspath(directory)
        error = None
        try:
            if not os.path.isdir(directory):
                raise ValueError(f"`directory` {directory!r} does not exist")
            name = _shard_name(self.rank, self.world_size)
            checkpoint.save(os.path.join(directory, name), self.inner, self.shard)
            digests = checkpoint._read(os.path.join(directory, name))[0]["sha256"]
        except (OSError, ValueError) as e:
            error, digests = f"rank {self.rank}: {e}", None
        everyone = _gather_objects(self, (error, digests))
        _raise_first_error(everyone)
        if self.rank == 0:
            manifest = {
                "format": MANIFEST_FORMAT, "version": 1,
                "optimizer": type(self.outer).__name__.lower(),
                "config": self.outer.get_config(),
                "layout": self.params.layout.to_dict(),
                "world_size": self.world_size, "bounds": self.bounds,
                "iterations": self.iterations,
                "shards": [{"file": _shard_name(r, self.world_size), "sha256": d}
                           for r, (_, d) in enumerate(everyone)],
            }
            text = json.dumps(manifest, sort_keys=True).encode()
            checkpoint._write_atomically(os.path.join(directory, MANIFEST),
                                         lambda f: f.write(text))
        _gather_objects(self, None)  # nobody returns before the manifest is written

    def load(self, directory):
        """Restore params and this rank's state from a checkpoint written by save() on
        any number of ranks; every rank calls it. Refused on every rank, with nothing
        changed, if any rank finds a shard missing, corrupt or from another run."""
        error = None
        try:
            state, shard_params = self._read_shard(os.fspath(directory))
        except (OSError, ValueError, KeyError, TypeError) as e:
            error = f"rank {self.rank}: {e}"
        _raise_first_error(_gather_objects(self, (error, None)))
        self.inner.load_state_dict(state)
        with cuda.on_device(self.params.device):
            self.shard.data[...] = cuda.to_device(shard_params, self.params.device)
        self._all_gather()

    def _read_shard(self, directory):
        manifest = read_manifest(directory)
        layout = Layout.from_dict(manifest["layout"])
        if layout != self.params.layout:
            raise ValueError("the checkpoint's layout does not match `params`: "
                             + self.params.layout.describe_difference(layout))
        if manifest["optimizer"] != type(self.outer).__name__.lower():
            raise ValueError(f"the checkpoint holds optimizer {manifest['optimizer']!r}, "
                             f"not {type(self.outer).__name__.lower()!r}")
        slots, params, counters = _read_range(directory, manifest, self.lo, self.hi,
                                              self.inner.slot_names)
        state = {"optimizer": type(self.inner).__name__.lower(),
                 "iterations": counters["iterations"],
                 "layout": self.shard.layout.to_dict(), "slots": slots,
                 "skipped_steps": counters["skipped_steps"],
                 "last_step_skipped": counters["last_step_skipped"]}
        self.inner._parse_state(state)  # refuse here, before anything changes
        return state, params


# ----------------------------------------------------------- checkpoints, any process
def read_manifest(directory):
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} holds no {MANIFEST}: not a sharded checkpoint")
    with open(path, "rb") as f:
        try:
            manifest = json.loads(f.read().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path!r} is corrupt: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path!r} is not a fusedopt sharded-checkpoint manifest")
    return manifest


def _read_range(directory, manifest, lo, hi, slot_names):
    """(slots, params, counters) for elements [lo, hi) of the whole buffer, read from
    every shard file that overlaps them, each checked against the manifest."""
    dtype = np.dtype(manifest["layout"]["dtype"])
    params = np.empty(hi - lo, dtype=dtype)
    slots = {name: np.empty(hi - lo, dtype=dtype) for name in slot_names}
    counters = None
    for (a, b), entry in zip(manifest["bounds"], manifest["shards"]):
        if b <= lo or a >= hi:
            continue
        path = os.path.join(directory, entry["file"])
        if not os.path.isfile(path):
            raise ValueError(f"shard {entry['file']!r} of the checkpoint in {directory!r} "
                             "is missing")
        meta, arrays = checkpoint._read(path)
        if meta["sha256"] != entry["sha256"]:
            raise ValueError(f"shard {entry['file']!r} in {directory!r} is not the one its "
                             "manifest names (from another run or another save)")
        start, stop = max(a, lo), min(b, hi)
        params[start - lo:stop - lo] = arrays["params"][start - a:stop - a]
        for name in slot_names:
            if f"slot.{name}" not in arrays:
                raise ValueError(f"shard {entry['file']!r} has no state slot {name!r}")
            slots[name][start - lo:stop - lo] = arrays[f"slot.{name}"][start - a:stop - a]
        counters = {k: meta[k] for k in ("iterations", "skipped_steps", "last_step_skipped")}
    return slots, params, counters


def load_unsharded(directory, device="cpu"):
    """(optimizer, params) of a single process from a sharded checkpoint, bitwise."""
    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    layout = Layout.from_dict(manifest["layout"])
    opt = _lookup(manifest["optimizer"]).from_config(manifest["config"])
    slots, params, counters = _read_range(directory, manifest, 0, layout.size, opt.slot_names)
    opt.load_state_dict({"optimizer": manifest["optimizer"], "layout": layout.to_dict(),
                         "slots": slots, **counters})
    flat = FlatBuffer(params, layout.shapes).to(device)
    opt.build(flat)
    return opt, flat


# ------------------------------------------------------------------------ helpers
def clipnorm_factors(xp, sums, clipnorm):
    """reference.clipnorm_factor over a vector of sums of squares (float64)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = xp.where(sums > 0, xp.sqrt(xp.maximum(sums, 0)), sums)
        return xp.where(xp.isnan(norm), np.nan, clipnorm / xp.maximum(norm, clipnorm))


def global_clipnorm_factors(xp, sums, clipnorm):
    """reference.global_clipnorm_factor over a vector of sums of squares (float64)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        norm = xp.sqrt(sums)
        inverse = xp.where(norm == 0, np.inf, 1.0 / xp.where(norm == 0, 1.0, norm))
        factor = clipnorm * xp.minimum(inverse, 1.0 / clipnorm)
        return xp.where(xp.isfinite(norm), factor, np.nan)


def _sum_of_squares(xp, g, unscale):
    if xp is np:
        return reference._sum_of_squares(g, unscale)  # the NumPy executor's own sum
    x = g * unscale if unscale is not None else g
    x = x.astype(np.float64)
    return (x * x).sum()  # stays on the device


def _shard_optimizer(opt):
    """The optimizer that updates one shard: `opt`'s rule and settings without the
    options applied across ranks by ShardedOptimizer."""
    config = opt.get_config()
    config["learning_rate"] = opt._learning_rate  # the schedule object, not its config
    for name in _WHOLE_MODEL_OPTIONS:
        config[name] = None
    return type(opt)(**config, executor=opt.executor, num_threads=opt.num_threads)


def _tensor(array):
    import torch

    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)  # shares the memory
    return torch.from_dlpack(array)  # CuPy: zero-copy on the same device


def _from_tensor(t, xp):
    if xp is np:
        return t.numpy()
    return xp.from_dlpack(t)


def _gather_objects(sharded, obj):
    out = [None] * sharded.world_size
    _dist().all_gather_object(out, obj, group=sharded.group)
    return out


def _raise_first_error(everyone):
    errors = [e for e, _ in everyone if e is not None]
    if errors:
        raise ValueError("; ".join(errors))


def _agree(sharded, what, value):
    everyone = _gather_objects(sharded, json.dumps(value, sort_keys=True, default=repr))
    if any(v != everyone[0] for v in everyone):
        differ = [r for r, v in enumerate(everyone) if v != everyone[0]]
        raise ValueError(f"`params`/`opt`: ranks {differ} differ from rank 0 in {what}; "
                         "every rank must pass the same")


def _shard_name(rank, world_size):
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


__all__ = ["ShardedOptimizer", "load_unsharded", "read_manifest", "shard_bounds",
           "shard_pieces"]
