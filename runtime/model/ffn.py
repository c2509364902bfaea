"""A block's feed-forward half: a dense SwiGLU FFN, or routed experts plus the shared expert.

    dense:  down @ swiglu(gate @ x, up @ x)
    MoE:    shared(x) + sum over the K routed experts e of  weight_e * expert_e(x)
            (ids, weights) = route(router @ x): top-K of sigmoid + bias, weights unbiased,
            normalized and scaled (runtime.model.ops.route)

Routed experts come through the ExpertProvider; they are summed in expert order, so a
result is bit-identical whether its experts came from RAM, the cache or the disk.

Shape legend:  T tokens  H hidden  F FFN width  E experts  K experts used per token
"""

from __future__ import annotations

import numpy as np
from quant import int8_kernels

from runtime.model.experts import ExpertProvider
from runtime.model.matrix import matmul, matmul_many
from runtime.model.ops import group_by_expert, no_bias, rms_norm, route, route_rows, swiglu
from runtime.model.weights import FFN

# A chunk of more tokens than an MTP verify pass (at most 8) is a prefill chunk: it asks each layer
# for nearly all its experts in turn, a scan the expert cache keeps from flushing what it holds.
SCAN_TOKENS = 8


def dense(f: FFN, x: np.ndarray, limit: float, int8: int) -> np.ndarray:
    """SwiGLU FFN of x [T, H] -> [T, H] (int8: the model's int8 format set, see matrix.matmul)."""
    gate, up = matmul_many(x, [f.gate, f.up], int8)
    return matmul(swiglu(gate, up, limit), f.down, int8)


def moe(s, w, x: np.ndarray, logits: np.ndarray, experts: ExpertProvider) -> np.ndarray:
    """Routed experts plus the shared expert of x [T, H] -> [T, H], for router logits [T, E]."""
    ids, weights = route(logits, w.router_bias, s.n_expert_used, s.expert_scale, s.expert_norm)  # [T, K]
    groups = group_by_expert(ids)
    if s.int8 and experts.stats is None:  # nothing streams: every expert at hand, in one kernel call
        # The groups themselves (expert -> its rows), iterating as the experts ascending: a provider
        # that records routing (offload.profile) sees each token's experts, not the chunk's union.
        with experts.held(s.index, {e: groups[e] for e in sorted(groups)}) as got:
            if got is not None:  # held once: a provider that counts requests counts this one
                out = _fused_sum(s, w, x, weights, groups, got)
                return out if out is not None else _experts_sum(s, w, x, weights, groups, got)
    return _experts_sum(s, w, x, weights, groups, experts.experts(s.index, groups, scan=len(x) > SCAN_TOKENS))


def _fused_sum(s, w, x: np.ndarray, weights: np.ndarray, groups: dict, got) -> np.ndarray | None:
    """_experts_sum's result, the same bits, with the routed experts in one int8 kernel call
    (int8_kernels.swiglu_experts); None when an expert's matrices have no fused int8 kernel."""
    got = sorted(got, key=lambda g: g[0])
    descs = [ew.descriptor for _, ew in got]
    if any(d is None for d in descs):
        return None
    desc = np.stack(descs)
    if int8_kernels.format_set(np.unique(desc[:, :2]).tolist()) & ~s.int8:
        return None
    rows = [groups[e][0] for e, _ in got]
    starts = np.zeros(len(got) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=starts[1:])
    entry_weights = np.concatenate([weights[groups[e]] for e, _ in got])
    out = dense(w.shared, x, s.limit_shared, s.int8)
    int8_kernels.swiglu_experts(desc, np.concatenate(rows), starts, entry_weights,
                                np.full(len(got), s.limit, np.float32), np.ascontiguousarray(x, np.float32), out,
                                s.int8)
    return out


def _experts_sum(s, w, x: np.ndarray, weights: np.ndarray, groups: dict, got) -> np.ndarray:
    """The shared expert plus the routed experts, which arrive as (id, weights) in any order."""
    out = dense(w.shared, x, s.limit_shared, s.int8)
    ys = {}
    for e, ew in got:
        rows, slots = groups[e]
        ys[e] = dense(ew, x[rows], s.limit, s.int8) * weights[rows, slots][:, None]
    for e in sorted(ys):
        out[groups[e][0]] += ys[e]
    return out


def moe_decode(s, w, plan, x: np.ndarray, logits: np.ndarray, experts: ExpertProvider, h: np.ndarray,
               scratch) -> None:
    """One token's MoE FFN of x [1, H] added into h [H]: with the provider holding all K experts
    at once, in one fused int8 call (plan: a decode_plan.FFNPlan, scratch: its FFNScratch);
    otherwise as in prefill. Where every expert is resident (ExpertProvider.descriptors), the
    routing kernel writes the call's inputs: no Python per expert (a decode step's Python was
    a tenth of its time on a 9-block miniature)."""
    table = experts.descriptors(s.index) if plan is not None else None
    if table is not None:  # every expert resident: the rows are picked by the routing kernel
        route_rows(logits, no_bias(w.router_bias), s.n_expert_used, np.float32(s.expert_scale), s.expert_norm,
                   table, plan.desc, plan.weights)
        int8_kernels.swiglu_ffns(plan.desc, plan.weights, plan.limits, x[0], h, scratch, s.int8)
        return
    ids, weights = route(logits, w.router_bias, s.n_expert_used, s.expert_scale, s.expert_norm, ascending=True)
    if plan is not None and hasattr(experts, "arriving"):
        with experts.arriving(s.index, ids[0].tolist()) as got:
            if got is not None:
                _moe_as_read(s, w, plan, x, weights, ids, got, h, scratch)
                return
    with experts.held(s.index, ids[0].tolist()) as got:
        if got is not None and plan is not None:
            descs = [ew.descriptor for _, ew in sorted(got, key=lambda g: g[0])]
            if all(d is not None for d in descs):
                plan.desc[1:] = descs
                plan.weights[1:] = weights[0]
                int8_kernels.swiglu_ffns(plan.desc, plan.weights, plan.limits, x[0], h, scratch, s.int8)
                return
        groups = {int(e): (np.zeros(1, np.int64), np.array([k])) for k, e in enumerate(ids[0])}
        f = _experts_sum(s, w, x, weights, groups, got if got is not None else experts.experts(s.index, groups))
    h += f[0]


def _moe_as_read(s, w, plan, x: np.ndarray, weights: np.ndarray, ids: np.ndarray, got, h: np.ndarray,
                 scratch) -> None:
    """moe_decode's fused call split by readiness, for a streaming provider (`got`: its `arriving`
    pair): the shared expert and the routed experts already resident first, while the others are
    read, then each of those as its read finishes. Each FFN's output row is the fused call's and
    the rows are summed at the end in the fused call's order, so h gets the same bits. An expert
    with no fused int8 kernel sends the step through the per-expert path, as in `held`'s case."""
    ready, later = got
    order = ids[0].tolist()  # ascending: the fused call's entry order after the shared expert
    row = {e: 1 + k for k, e in enumerate(order)}
    y = np.empty((1 + len(order), x.shape[1]), np.float32)
    lim = plan.limits
    done = list(ready)
    if all(ew.descriptor is not None for _, ew in ready):
        first = [0] + [row[e] for e, _ in ready]
        desc = np.stack([plan.desc[0]] + [ew.descriptor for _, ew in ready])
        y[first] = int8_kernels.swiglu_ffn_outputs(desc, lim[first], x[0], scratch, s.int8)
        for e, ew in later:
            done.append((e, ew))
            if ew.descriptor is None:
                break
            r = row[e]
            y[r] = int8_kernels.swiglu_ffn_outputs(ew.descriptor[None], lim[r:r + 1], x[0], scratch, s.int8)[0]
        else:
            wts = plan.weights.copy()
            wts[1:] = weights[0]
            int8_kernels.add_ffn_outputs(y, wts, h)
            return
    done += list(later)
    groups = {int(e): (np.zeros(1, np.int64), np.array([k])) for k, e in enumerate(order)}
    h += _experts_sum(s, w, x, weights, groups, done)[0]


def dense_decode(s, f: FFN, plan, x: np.ndarray, h: np.ndarray, scratch) -> None:
    """One token's dense FFN of x [1, H] added into h [H]; one fused int8 call where the plan has one."""
    if plan is not None:
        int8_kernels.swiglu_ffns(plan.desc, plan.weights, plan.limits, x[0], h, scratch, s.int8)
    else:
        h += dense(f, x, s.limit_shared, s.int8)[0]


def guess_experts(s, w, h: np.ndarray) -> np.ndarray:
    """Block s's likely experts for hidden states h [T, H] of an earlier block, most likely first.

    Its router on those states; experts are ranked by how many tokens pick them, then by
    the best rank any token gives them.
    """
    ids, _ = route(matmul(rms_norm(h, w.ffn_norm, s.eps), w.router), w.router_bias, s.n_expert_used,
                   s.expert_scale, s.expert_norm)  # [T, K], each row best first
    votes: dict[int, tuple[int, int]] = {}
    for rank, e in zip(np.tile(np.arange(ids.shape[1]), ids.shape[0]).tolist(), ids.ravel().tolist()):
        n, best = votes.get(e, (0, rank))
        votes[e] = (n + 1, min(best, rank))
    return np.asarray(sorted(votes, key=lambda e: (-votes[e][0], votes[e][1])), dtype=np.int64)
