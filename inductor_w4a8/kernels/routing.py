"""Router: [T, E] logits -> fp32 [T, top_k] weights, int32 [T, top_k] expert ids (vLLM FusedMoE).

One program per token. The E experts are viewed as a [n_group, E // n_group] tile (one group when
grouped top-k is off), so every step is a masked reduction over that tile:
  scores = softmax(logits) or sigmoid(logits), in fp32;
  choice = scores + correction_bias (the bias picks experts, it never weighs them);
  grouped top-k: a group's score is the sum of its top-2 choices (with a bias) or its max choice
  (without), the topk_group best groups are kept and the others masked to -inf;
  top-k: top_k rounds of "take the largest remaining choice" (ties go to the lowest id; a NaN
  choice ranks above every number, as in torch.topk), then each chosen expert's score is its
  weight;
  weights /= max(sum(weights), tiny) when RENORMALIZE, then *= routed_scaling_factor.
Ids are distinct and in [0, E) for any logits, NaN included, so later kernels never see an id
out of range; a NaN among the chosen weights makes every renormalized weight NaN (as torch).
With SORT_ONE_TOKEN (T = 1) the program also writes sort_by_expert's outputs for that token
(`moe_sort.sort_one_token`): routing and sorting in one launch.
"""
import triton
import triton.language as tl

from .moe_sort import sort_one_token
from .pdl import wait_for_prior_kernels


NO_KEY: tl.constexpr = tl.constexpr(-(2**63))


@triton.jit
def route_token(logits_ptr, bias_ptr, t, stride_t, E, n_group, group_len, topk_group, scaling,
                TOP_K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GL: tl.constexpr,
                BLOCK_K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
                GROUPED: tl.constexpr, RENORMALIZE: tl.constexpr):
    """(fp32 weights, int32 ids) [BLOCK_K] of token t (the first TOP_K valid): the steps above."""
    g = tl.arange(0, BLOCK_G)
    e = g[:, None] * group_len + tl.arange(0, BLOCK_GL)[None, :]
    valid = (g[:, None] < n_group) & (tl.arange(0, BLOCK_GL)[None, :] < group_len)
    x = tl.load(logits_ptr + t * stride_t + e, mask=valid, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        m = tl.max(tl.max(x, axis=1), axis=0)
        p = tl.where(valid, tl.exp(x - m), 0.0)
        scores = tl.math.div_rn(p, tl.sum(tl.sum(p, axis=1), axis=0))
    else:
        scores = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + tl.exp(-x))
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))

    if GROUPED:
        best = tl.max(choice, axis=1)                                        # [BLOCK_G]
        if HAS_BIAS:  # sum of the group's two largest choices
            col = tl.arange(0, BLOCK_GL)[None, :]
            first = tl.min(tl.where(choice == best[:, None], col, BLOCK_GL), axis=1)
            second = tl.max(tl.where(col == first[:, None], float("-inf"), choice), axis=1)
            best = tl.where(group_len >= 2, best + second, best)
        group_score = tl.where(g < n_group, best, float("-inf"))
        keep = g < 0
        for _ in range(topk_group):
            top = tl.max(tl.where(keep, float("-inf"), group_score), axis=0)
            pick = tl.min(tl.where((group_score == top) & ~keep & (g < n_group), g, BLOCK_G), axis=0)
            pick = tl.where(pick == BLOCK_G, tl.min(tl.where(~keep, g, BLOCK_G), axis=0), pick)
            keep = keep | (g == pick)
        choice = tl.where(keep[:, None], choice, float("-inf"))

    # top-k: each round is one int64 max over keys that order experts by choice, then by lower
    # id (a float's bits made monotone as int32, above the id's complement), so one reduction
    # finds both the best choice and its lowest id; taken and padding lanes hold the minimum
    # key. The weights are gathered after the rounds in one batched reduction.
    kk = tl.arange(0, BLOCK_K)
    choice = tl.where(choice != choice, float("nan"), choice)   # one NaN (sign bit clear) for all
    bits = choice.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    key = tl.where(valid, (ordered << 32) | (0x7FFFFFFF - e).to(tl.int64), NO_KEY)
    top_id = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.max(key, axis=1), axis=0)
        idx = tl.minimum(tl.maximum(0x7FFFFFFF - best.to(tl.int32), 0), E - 1)   # low 32 bits
        key = tl.where(e == idx, NO_KEY, key)
        top_id = tl.where(kk == j, idx, top_id)
    hit = e[None, :, :] == top_id[:, None, None]                             # [BLOCK_K, G, GL]
    top_w = tl.sum(tl.sum(tl.where(hit, scores[None, :, :], 0.0), axis=2), axis=1)
    top_w = tl.where(kk < TOP_K, top_w, 0.0)
    if RENORMALIZE:
        total = tl.sum(top_w, axis=0)
        total = tl.where(total != total, total, tl.maximum(total, 1.1754943508222875e-38))
        top_w = tl.math.div_rn(top_w, total)
    top_w = top_w * scaling
    return top_w, top_id


@triton.jit
def routing_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, sorted_rows_ptr, flat_to_sorted_ptr,
                   offsets_ptr, stride_t, E, n_group, group_len, topk_group, scaling,
                   TOP_K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GL: tl.constexpr,
                   BLOCK_K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
                   GROUPED: tl.constexpr, RENORMALIZE: tl.constexpr, SORT_ONE_TOKEN: tl.constexpr,
                   BLOCK_E1: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_prior_kernels(PDL)
    t = tl.program_id(0).to(tl.int64)
    top_w, top_id = route_token(logits_ptr, bias_ptr, t, stride_t, E, n_group, group_len,
                                topk_group, scaling, TOP_K, BLOCK_G, BLOCK_GL, BLOCK_K, SOFTMAX,
                                HAS_BIAS, GROUPED, RENORMALIZE)
    kk = tl.arange(0, BLOCK_K)
    tl.store(weights_ptr + t * TOP_K + kk, top_w, mask=kk < TOP_K)
    tl.store(ids_ptr + t * TOP_K + kk, top_id, mask=kk < TOP_K)
    if SORT_ONE_TOKEN:
        sort_one_token(top_id, sorted_rows_ptr, flat_to_sorted_ptr, offsets_ptr, E, TOP_K, BLOCK_K,
                       BLOCK_E1)
