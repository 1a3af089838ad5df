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
       it: clipvalue, weight decay, the rule, EMA, gradient accumulation, the counters)
    -> all-gather of the params (each rank broadcasts its shard).

Why a wrapper and not an option on every optimizer: the sharded step needs a process
group, a shard, scratch buffers and collectives, none of which a single-process
optimizer should know about (ARCHITECTURE.md, principle 10: lower floors never import
upper ones). The wrapper takes a configured optimizer, so every rule and option is
available unchanged, and builds the shard's optimizer from its config.

Two ways to cut the buffer. Elementwise rules: into N contiguous shards differing in
size by at most one element; a segment may straddle a boundary, and the shard's
segment table is cut there. Rules that read whole variables (`whole_variable`: Lamb's
trust ratio, Adafactor's factored moments, Muon's orthogonalisation): at segment
boundaries, each rank owning whole segments (the cut nearest the even split), so the
shard's rule sees whole variables and nothing is gathered; shards are then only as
even as the segments allow, and every rank needs one segment that holds elements.

How the whole-model quantities reach the shard's update without a second pipeline:
the shard's optimizer is the user's one with `loss_scale_factor`, `global_clipnorm`
and (elementwise rules) `clipnorm` removed, and this module multiplies the shard's
gradient by 1/loss_scale_factor and then by the norm-clip factor, in the storage
dtype, before the update: exactly the two multiplications the kernels' prologue
(fused_element in kernels/common.cuh) and the NumPy executor make first, in the same
order, so the rule sees the same gradient bits. Everything after (clip by value,
weight decay, the rule, EMA, accumulation, iterations) stays in the executors. The
factors are computed with the same float64 formulas as fusedopt.reference's, on the
array module of the buffers (CuPy on a GPU: no host read in the step). A
whole-variable rule's shard holds whole segments, so its own optimizer keeps
`clipnorm` (the same sums, the same bits). skip_nonfinite: when any rank's gradient
holds inf or NaN, the factor is NaN on every rank; the shard's optimizer
(skip_nonfinite on) then sees a non-finite gradient and skips and counts the step
itself, on the device, on every rank together.

EMA and gradient accumulation are elementwise on state slots, so the shard's
optimizer carries them: the EMA `average` and the `gradient_accumulator` are sharded
like every other slot. Every call reduce-scatters, also the N-1 calls that only
accumulate: the accumulator then holds the sum of the ranks' means, call by call, as
a single process fed the mean gradient would, bit for bit, and it stays a 1/N shard.
(Accumulating each rank's own full gradient and reducing once on the N-th call moves
N times fewer bytes, but needs a whole-model accumulator on every rank, sums in
another order, and cannot skip one call's non-finite gradient alone.) The params are
all-gathered after the calls that can change them: the N-th, and one whose EMA
overwrite falls on an accumulate-only call. Not
carried: accumulation with `global_clipnorm`, or with `clipnorm` on an elementwise
rule: Keras clips the mean of the accumulated gradients, which exists only inside the
shard's optimizer on the N-th call, while the norm needs a sum across ranks first.

A LossScaleOptimizer is sharded as its inner optimizer with the dynamic scale kept
here, on the device, one copy per rank: the scale unscales the shard's gradient as
loss_scale_factor would, and the found-inf decision is the all-gathered non-finite
flag (or a scale that underflowed to 0), so every rank halves, keeps or doubles its
scale together. (A single process keeps the same scale in its optimizer's step state,
kernels/step.cuh; the shard's optimizer is a plain one, the scale applied here.)

Collectives have the timeout given to init_process_group: pass one there.
NCCL (CuPy buffers through DLPack) is written but untested here (no GPU).
"""

import contextlib
import json
import math
import os

import numpy as np

from . import checkpoint, cuda, reference
from .flat import FlatBuffer, Layout
from .loss_scale import LossScaleOptimizer
from .optimizer import FusedOptimizer, _lookup

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fusedopt-sharded-checkpoint"


def _dist():
    import torch.distributed as dist  # lazily: `import fusedopt` never imports torch

    return dist


def shard_bounds(size, world_size):
    """[lo, hi) of each rank's shard: contiguous, sizes differing by at most one."""
    return [(size * r // world_size, size * (r + 1) // world_size) for r in range(world_size)]


def segment_cuts(offsets, world_size):
    """Segment indices k_0 = 0 <= k_1 <= ... <= k_N = len(segments): rank r owns the
    whole segments [k_r, k_r+1), at least one of them not empty. Each cut is the
    segment boundary nearest the even split (the lower one on a tie) that leaves
    every rank a non-empty segment. ValueError when fewer segments than ranks hold
    elements."""
    size, nseg = offsets[-1], len(offsets) - 1
    full = [s for s in range(nseg) if offsets[s + 1] > offsets[s]]
    if len(full) < world_size:
        raise ValueError(
            f"`params`: a rule that reads whole variables is sharded at segment "
            f"boundaries, so every rank needs a segment that holds elements; "
            f"{len(full)} do, fewer than the {world_size} ranks")
    cuts = [0]
    for r in range(1, world_size):
        target = size * r / world_size
        # After the first non-empty segment this rank can own, up to the last cut that
        # leaves one non-empty segment for each later rank.
        low = min(s for s in full if s >= cuts[-1]) + 1
        high = full[len(full) - (world_size - r)]
        k = min(range(low, high + 1), key=lambda j: (abs(offsets[j] - target), j))
        cuts.append(k)
    return cuts + [nseg]


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
        opt: a fusedopt optimizer (or a LossScaleOptimizer around one), not yet built
            (it has taken no step); its hyperparameters are read once, here. It is not
            used for steps itself.
        params: the FlatBuffer every rank holds (same layout, names and dtype on every
            rank, checked here); updated in place by apply().
        group: a torch.distributed process group, or None for the default group,
            which must be initialised.
    Every rank must construct it, with the same arguments: construction runs
    collectives (the cross-rank checks). Every method that changes params or state
    (apply, the EMA methods, load, save) is collective: call it on every rank.
    """

    def __init__(self, opt, params, group=None):
        dist = _dist()
        if not isinstance(opt, FusedOptimizer):
            raise TypeError(f"`opt` must be a fusedopt optimizer, got {type(opt).__name__}")
        lso = opt if isinstance(opt, LossScaleOptimizer) else None
        base = opt.inner_optimizer if lso is not None else opt
        if base.built or base.iterations or opt.built:
            raise ValueError("`opt` already has state; pass a new optimizer and restore "
                             "state with ShardedOptimizer.load()")
        _check_carried(base)
        if not isinstance(params, FlatBuffer):
            raise TypeError(f"`params` must be a FlatBuffer, got {type(params).__name__}")
        for option in ("master_weights", "state_dtype", "stochastic_rounding"):
            if getattr(base, option):
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
        if callable(base.get_config()["learning_rate"]):  # a schedule is a dict there
            raise ValueError("`opt`: a callable learning_rate cannot be checked to agree "
                             "across ranks; use a number or a fusedopt.schedules schedule")
        _agree(self, "layout, names, dtype, device kind and optimizer config", {
            "layout": params.layout.to_dict(), "names": params.names,
            "device": params.device.split(":")[0],
            "optimizer": type(opt).__name__, "config": config})
        self.whole_variable = base.whole_variable
        if not self.whole_variable and params.size < self.world_size:  # (whole: segment_cuts)
            raise ValueError(f"`params` hold {params.size} elements, fewer than the "
                             f"{self.world_size} ranks: every rank needs a non-empty shard")
        self.outer = opt
        self._lso = lso
        # The options applied across ranks, fixed here: the shard's optimizer (`inner`)
        # has them off, and `opt` is not read again.
        across = ["loss_scale_factor", "global_clipnorm"]
        if not self.whole_variable:
            across.append("clipnorm")
        self._options = {n: getattr(base, n) for n in across}
        self._options["skip_nonfinite"] = base.skip_nonfinite
        self._cut(params)
        self.inner = _shard_optimizer(base, across, self._shard_segments, params)
        self.inner.build(self.shard)
        with cuda.on_device(params.device):
            xp = params.xp
            self._grad = xp.empty(self.hi - self.lo, dtype=params.dtype)
            if lso is not None:  # the dynamic scale and its counter, as LSO keeps them
                self._scale = xp.full(1, lso.initial_scale, dtype=np.float32)
                self._scale_counter = xp.zeros(1, dtype=np.float64)
        self._t_params = _tensor(params.data)
        self._t_grad = _tensor(self._grad)
        self._ema_swapped = False

    def _cut(self, params):
        """This rank's shard: `bounds` of every rank, `pieces` (segment, start, stop)
        of this one, the shard's FlatBuffer and which segment each of its segments is."""
        offsets = params.offsets
        if self.whole_variable:
            self.cuts = segment_cuts(offsets, self.world_size)
            self.bounds = [(offsets[a], offsets[b])
                           for a, b in zip(self.cuts[:-1], self.cuts[1:])]
            first, last = self.cuts[self.rank], self.cuts[self.rank + 1]
            self.pieces = [(s, offsets[s], offsets[s + 1]) for s in range(first, last)]
            shapes = [params.shapes[s] for s, _, _ in self.pieces]
        else:
            self.cuts = None
            self.bounds = shard_bounds(params.size, self.world_size)
            self.pieces = shard_pieces(offsets, *self.bounds[self.rank])
            shapes = [(b - a,) for _, a, b in self.pieces]
        self.lo, self.hi = self.bounds[self.rank]
        self._shard_segments = [s for s, _, _ in self.pieces]
        names = None if params.names is None else [params.names[s] for s in self._shard_segments]
        self.shard = FlatBuffer(params.data[self.lo:self.hi], shapes, names)

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
        own = int(self._scale.nbytes + self._scale_counter.nbytes) if self._lso is not None else 0
        return own + sum(int(s.nbytes) for s in self.inner.slots().values())

    @property
    def dynamic_scale(self):
        """A LossScaleOptimizer's current loss scale (the same on every rank)."""
        self._require_loss_scale("dynamic_scale")
        return float(cuda.to_device(self._scale, "cpu")[0])

    @property
    def step_counter(self):
        """A LossScaleOptimizer's finite steps since its scale last changed."""
        self._require_loss_scale("step_counter")
        return int(cuda.to_device(self._scale_counter, "cpu")[0])

    def scale_loss(self, loss):
        """loss * the current loss scale (LossScaleOptimizer.scale_loss)."""
        return loss * self.dynamic_scale

    def _require_loss_scale(self, what):
        if self._lso is None:
            raise ValueError(f"`{what}` belongs to a sharded LossScaleOptimizer; this "
                             f"shards a {type(self.outer).__name__}")

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
        if self._ema_swapped:  # the same on every rank: refused before any collective
            raise ValueError("`params` hold the EMA weights (swap_ema_weights); swap them "
                             "back before the next step")
        with cuda.on_device(self.params.device):  # this rank's GPU, not CuPy's default
            shard = self._reduce_scatter(g) if not reduced else g[self.lo:self.hi]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                shard, bad = self._prologue(shard)  # inf and NaN are skipped, not warned
            gather = self._params_may_change()
            self.inner.apply(shard, self.shard)
            if self._lso is not None:
                self._update_scale(bad)
            if gather:
                self._all_gather()

    def _params_may_change(self):
        """Whether the coming call can change the params, so that they are all-gathered
        after it: every call but one that only accumulates and has no EMA overwrite
        (Keras' order: the update on every N-th call, the overwrite when
        (calls // N + 1) % frequency == 0). Decided from the call count where the host
        knows it without a sync (the same count on every rank, as every rank skips
        together); on a GPU with skip_nonfinite only the device knows it: always."""
        inner = self.inner
        steps = inner.gradient_accumulation_steps
        if not steps or (inner.skip_nonfinite and inner.executor_name == "cuda"):
            return True
        calls = inner._plan.next_iteration
        if (calls + 1) % steps == 0:
            return True
        frequency = inner.ema_overwrite_frequency if inner.use_ema else None
        return bool(frequency) and (calls // steps + 1) % frequency == 0

    def _reduce_scatter(self, g):
        dist = _dist()
        t = _tensor(g)
        dist.reduce_scatter(self._t_grad, [t[a:b] for a, b in self.bounds], group=self.group)
        # The mean as sum / N in the storage dtype (no AVG on gloo); a single process
        # taking sum / N of the same sum gets the same bits.
        self.params.xp.divide(self._grad, self.world_size, out=self._grad)
        return self._grad

    def _unscale(self):
        """1/loss scale in the storage dtype, as the executors take it from
        loss_scale_factor: a number, or on the device for a LossScaleOptimizer."""
        dt = self.params.dtype.type
        if self._lso is not None:
            return (1.0 / self._scale.astype(np.float64)).astype(dt)
        factor = self._options["loss_scale_factor"]
        return dt(1.0 / factor) if factor else None

    def _prologue(self, g):
        """(The shard's gradient unscaled and norm-clipped with factors of the whole
        model, or NaN everywhere (skip_nonfinite) when any rank's is not finite;
        whether any rank's was not finite, on the device, or None if not asked)."""
        opt = self._options
        if not any(opt.values()) and self._lso is None:
            return g, None
        dt = self.params.dtype.type
        unscale = self._unscale()
        if g is not self._grad:  # already-reduced grads belong to the caller
            self._grad[...] = g
            g = self._grad
        factors, bad = self._factors(g, unscale)  # one per segment, float64, on the device
        if unscale is not None:
            g *= unscale
        if factors is not None:
            if opt.get("clipnorm"):
                for s, a, b in self.pieces:
                    g[a - self.lo:b - self.lo] *= factors[s].astype(dt)
            else:
                g *= factors[0].astype(dt)
        return g, bad

    def _factors(self, g, unscale):
        """(Per segment (clipnorm) or one (otherwise) float64 factor on the device, from
        sums of squares and the non-finite flag of every rank, or None if none applies;
        the flag)."""
        opt, xp = self._options, self.params.xp
        clipnorm, global_clipnorm = opt.get("clipnorm"), opt["global_clipnorm"]
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
            return None, None  # loss_scale_factor alone needs nothing from other ranks
        total = self._sum_over_ranks(local)
        sums, bad = total[:nseg], total[nseg] > 0
        if self._lso is not None:
            # A scale that underflowed to 0 skips the step, as a single process's
            # LossScaleOptimizer does (kernels/step.cuh, fo_phase), on every rank.
            bad = bad | (self._scale[0] == 0)
        if clipnorm:
            factors = clipnorm_factors(xp, sums, clipnorm)
        elif global_clipnorm:
            factors = global_clipnorm_factors(xp, sums, global_clipnorm)
        else:
            factors = xp.ones(1, dtype=np.float64)
        if opt["skip_nonfinite"]:
            factors = xp.where(bad, np.nan, factors)
        return factors, (bad if opt["skip_nonfinite"] else None)

    def _update_scale(self, bad):
        """reference.loss_scale_update on the device, from the flag every rank shares."""
        xp, scale, counter = self.params.xp, self._scale, self._scale_counter
        grow = counter == self._lso.dynamic_growth_steps - 1
        new_scale = xp.where(bad, scale * np.float32(0.5),
                             xp.where(grow, scale * np.float32(2.0), scale))
        counter[...] = xp.where(bad | grow, 0.0, counter + 1.0)
        scale[...] = new_scale.astype(np.float32)

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
            if a == b:  # every rank knows the bounds: all skip it together
                continue
            src = r if self.group is None else dist.get_global_rank(self.group, r)
            dist.broadcast(self._t_params[a:b], src=src, group=self.group)

    # ------------------------------------------------------------------------- EMA
    def swap_ema_weights(self):
        """Exchange params and the EMA average on every rank (each its shard, then the
        params all-gathered); call it again to swap back. Steps are refused meanwhile."""
        self.inner.swap_ema_weights(self.shard)  # refuses without use_ema, on every rank
        self._ema_swapped = not self._ema_swapped
        with cuda.on_device(self.params.device):
            self._all_gather()

    def ema_weights(self):
        """A context manager: params hold the moving average inside the block."""

        @contextlib.contextmanager
        def swapped():
            self.swap_ema_weights()
            try:
                yield self.params
            finally:
                self.swap_ema_weights()

        return swapped()

    def finalize_variable_values(self):
        """Keras' end of training: with use_ema, the moving average into the params on
        every rank; without, nothing changes."""
        if not self.inner.use_ema:
            return
        self.inner.finalize_variable_values(self.shard)
        with cuda.on_device(self.params.device):
            self._all_gather()

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
            if self.cuts is not None:
                manifest["segments"] = self.cuts
            if self.params.names is not None:
                manifest["names"] = list(self.params.names)
            if self._lso is not None:  # the same on every rank; float32 and a count,
                manifest["loss_scale"] = {  # both exact in JSON
                    "dynamic_scale": self.dynamic_scale, "step_counter": self.step_counter}
            text = json.dumps(manifest, sort_keys=True).encode()
            checkpoint._write_atomically(os.path.join(directory, MANIFEST),
                                         lambda f: f.write(text))
        _gather_objects(self, None)  # nobody returns before the manifest is written

    def load(self, directory):
        """Restore params and this rank's state from a checkpoint written by save() on
        any number of ranks; every rank calls it. Refused on every rank, with nothing
        changed, if any rank finds a shard missing, corrupt or from another run, or
        state of another optimizer or configuration."""
        if self._ema_swapped:  # the same on every rank: refused before any collective
            raise ValueError("`params` hold the EMA weights (swap_ema_weights); swap them "
                             "back before loading")
        error = None
        try:
            state, shard_params, scale = self._read_shard(os.fspath(directory))
        except (OSError, ValueError, KeyError, TypeError) as e:
            error = f"rank {self.rank}: {e}"
        _raise_first_error(_gather_objects(self, (error, None)))
        self.inner.load_state_dict(state)
        with cuda.on_device(self.params.device):
            self.shard.data[...] = cuda.to_device(shard_params, self.params.device)
            if self._lso is not None:
                self._scale[...] = cuda.to_device(scale[0], self.params.device)
                self._scale_counter[...] = cuda.to_device(scale[1], self.params.device)
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
        if (manifest.get("segments") is None) != (self.cuts is None):
            raise ValueError("the checkpoint was sharded "
                             + ("within" if self.cuts is not None else "at") + " variables, "
                             "as another kind of rule is")
        first, last = (self.cuts[self.rank], self.cuts[self.rank + 1]) if self.cuts \
            else (None, None)
        want = _ranges(layout.shapes, self.inner, (self.lo, self.hi), (first, last))
        arrays, meta = _read_ranges(directory, manifest, want, type(self.inner))
        state = {"optimizer": type(self.inner).__name__.lower(),
                 "iterations": meta["iterations"],
                 "layout": self.shard.layout.to_dict(),
                 "slots": {k[len("slot."):]: v for k, v in arrays.items() if k != "params"},
                 "skipped_steps": meta["skipped_steps"],
                 "last_step_skipped": meta["last_step_skipped"]}
        self.inner._parse_state(state)  # refuse here, before anything changes
        scale = _loss_scale_arrays(manifest) if self._lso is not None else None
        return state, arrays["params"], scale


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


def _ranges(shapes, opt, elements, segments):
    """{array name in a shard file: (start, stop, slot kind)} of the whole model's
    params and `opt`'s slots that one shard holds: the element range `elements`, or
    for a shard of whole segments [first, last) each slot's own positions (Adafactor's
    factored slots are not the params' size)."""
    first, last = segments
    out = {"params": (*elements, None)}
    for spec in opt._all_slot_specs():
        kind = spec[2] if len(spec) > 2 else None
        if first is None:
            out[f"slot.{spec[0]}"] = (*elements, kind)
        else:
            offsets = _offsets(reference.slot_shapes(kind, shapes))
            out[f"slot.{spec[0]}"] = (offsets[first], offsets[last], kind)
    return out


def _offsets(shapes):
    sizes = [math.prod(s) for s in shapes]
    return [int(x) for x in np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))]


def _read_ranges(directory, manifest, want, inner_class):
    """({name: array} for the ranges `want` (see _ranges), read from every shard file
    that overlaps them, each checked against the manifest; the counters)."""
    layout = Layout.from_dict(manifest["layout"])
    dtype = np.dtype(layout.dtype)
    out = {name: np.empty(b - a, dtype=dtype) for name, (a, b, _) in want.items()}
    cuts = manifest.get("segments")
    meta = None
    for q, entry in enumerate(manifest["shards"]):
        if cuts is None:
            theirs = {name: tuple(manifest["bounds"][q]) for name in want}
        else:
            theirs = {name: (_offsets(reference.slot_shapes(kind, layout.shapes))[cuts[q]],
                             _offsets(reference.slot_shapes(kind, layout.shapes))[cuts[q + 1]])
                      for name, (_, _, kind) in want.items()}
        overlaps = {name for name, (a, b, _) in want.items()
                    if max(a, theirs[name][0]) < min(b, theirs[name][1])}
        if not overlaps and (meta is not None or q < len(manifest["shards"]) - 1):
            continue  # (the counters come from the last shard if nothing overlaps)
        meta, arrays = _read_shard_file(directory, entry, inner_class, want)
        for name in overlaps:
            a, b, _ = want[name]
            c, d = theirs[name]
            start, stop = max(a, c), min(b, d)
            out[name][start - a:stop - a] = arrays[name][start - c:stop - c]
    counters = {k: meta[k] for k in ("iterations", "skipped_steps", "last_step_skipped")}
    return out, counters


def _read_shard_file(directory, entry, inner_class, want):
    path = os.path.join(directory, entry["file"])
    if not os.path.isfile(path):
        raise ValueError(f"shard {entry['file']!r} of the checkpoint in {directory!r} "
                         "is missing")
    meta, arrays = checkpoint._read(path)
    if meta["sha256"] != entry["sha256"]:
        raise ValueError(f"shard {entry['file']!r} in {directory!r} is not the one its "
                         "manifest names (from another run or another save)")
    if meta["optimizer"] != inner_class.__name__.lower():
        raise ValueError(f"shard {entry['file']!r} holds {meta['optimizer']!r} state, not "
                         f"{inner_class.__name__.lower()!r}")
    if set(arrays) != set(want):
        names = sorted(k[len("slot."):] for k in arrays if k != "params")
        expected = sorted(k[len("slot."):] for k in want if k != "params")
        raise ValueError(f"shard {entry['file']!r} holds state slots {names}, but this "
                         f"configuration keeps {expected}")
    return meta, arrays


def _loss_scale_arrays(manifest):
    saved = manifest.get("loss_scale")
    if not isinstance(saved, dict):
        raise ValueError("the checkpoint has no loss scale: not a LossScaleOptimizer's")
    scale = np.array([saved["dynamic_scale"]], dtype=np.float32)
    counter = np.array([saved["step_counter"]], dtype=np.float64)
    if not (np.isfinite(scale[0]) and scale[0] >= 0 and counter[0] >= 0):
        raise ValueError(f"the checkpoint's loss scale {saved} is invalid")
    return scale, counter


def load_unsharded(directory, device="cpu"):
    """(optimizer, params) of a single process from a sharded checkpoint, bitwise."""
    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    layout = Layout.from_dict(manifest["layout"])
    config = dict(manifest["config"])
    opt = _lookup(manifest["optimizer"]).from_config(config)
    base = opt.inner_optimizer if isinstance(opt, LossScaleOptimizer) else opt
    nseg = len(layout.shapes)
    segments = (0, nseg) if manifest.get("segments") is not None else (None, None)
    want = _ranges(layout.shapes, base, (0, layout.size), segments)
    arrays, counters = _read_ranges(directory, manifest, want, type(base))
    slots = {k[len("slot."):]: v for k, v in arrays.items() if k != "params"}
    name = type(base).__name__.lower()
    if base is not opt:
        slots.update(zip(("dynamic_scale", "step_counter"), _loss_scale_arrays(manifest)))
        name = "lossscaleoptimizer"
    opt.load_state_dict({"optimizer": name, "layout": layout.to_dict(), "slots": slots,
                         **counters})
    flat = FlatBuffer(arrays["params"], layout.shapes, manifest.get("names")).to(device)
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


def _check_carried(opt):
    """Refuse, before any collective, what the sharded step cannot do exactly."""
    if opt.gradient_accumulation_steps and (
            opt.global_clipnorm or (opt.clipnorm and not opt.whole_variable)):
        clip = "global_clipnorm" if opt.global_clipnorm else "clipnorm"
        raise ValueError(
            f"`opt`: gradient_accumulation_steps with `{clip}` cannot be sharded: Keras "
            "clips the mean of the accumulated gradients, which only the shard's optimizer "
            "forms (on the N-th call), but its norm needs a sum across ranks first. "
            "Accumulate without it, or use clipvalue")


def _shard_optimizer(opt, across, segments, params):
    """The optimizer that updates one shard: `opt`'s rule and settings without the
    options applied across ranks (`across`), its per-segment settings (lr multipliers,
    weight decay on/off, Muon's segment names) those of the shard's `segments` (the
    index in `params` of each segment of the shard)."""
    config = opt.get_config()
    config["learning_rate"] = opt._learning_rate  # the schedule object, not its config
    for name in across:
        config[name] = None
    table = opt._segment_request.resolve(len(params), params.names)
    rows = [(table.multipliers[s], table.decay[s]) for s in segments]
    config["segment_attributes"] = None if table.is_default else {
        "lr_multipliers": [m for m, _ in rows], "decay": [d for _, d in rows]}
    if config.get("segment_names") is not None:  # Muon's own names, one per segment
        config["segment_names"] = [config["segment_names"][s] for s in segments]
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


__all__ = ["ShardedOptimizer", "load_unsharded", "read_manifest", "segment_cuts",
           "shard_bounds", "shard_pieces"]
