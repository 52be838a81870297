"""The plan search of the speculation controller (router/controller.py's
module docstring describes the rule): per step, starting from no drafts,
extend the request whose extension gains the most expected tokens per added
second while it raises goodput, then try every uniform depth as a whole plan."""

import numpy as np


def greedy_plan(ctl, sched, auto, q, ctx, fixed_k, sampling, k, breakeven, lag_all) -> float:
    """The controller's plan search. ctl: the Controller, whose cost model,
    acceptance estimate, expert overlap and per-request state it reads; it
    sets k[i] for the auto entries, fills breakeven, and updates the probe
    interval new requests start at. Returns the plan's expected goodput over
    none drafting, as priced (what the controller's off probes read). Rounds of: every request's best extension
    (tokens gained per second added, priced at the round's plan), then, in
    order of that ratio, take each whose price re-checked at the current plan
    still raises goodput. Scalar Python over at most B * k_max candidates per
    round (cheaper than array code at the sizes a step has), on arrays from
    ctl.array_from requests (the uniform-depth phase too)."""
    cost, ex = ctl.cost, ctl.cost.experts
    c0, c_seq, c_tok, c_exp, c_attn, c_a2a, c_past = (float(v) for v in cost.c)
    d_any, d_seq, d_tok, d_depth, d_lag = (float(v) for v in cost.d)
    # tokens: c_tok each up to the knee, c_past each beyond (+ the all-to-all's share of every one):
    # c_tok * min(n, knee) + c_past * max(n - knee, 0) = c_past * n + (c_tok - c_past) * min(n, knee)
    knee, c_a2a = cost.knee, c_a2a * cost.a2a_mb_per_token
    c_lin, c_bend = c_past + c_a2a, c_tok - c_past
    beta, distinct = ex.beta, ex.predict_from_neff       # distinct experts per layer from n_eff
    exp_scale = c_exp * cost.moe_layers / cost.ep
    ids = [sched[i].req.id for i in auto]
    caps = [min(sched[i].k, ctl.k_max) for i in auto]
    probes = []
    for j, rid in enumerate(ids):          # cool-downs and probes
        st = ctl._new_state(rid)
        if st.cooldown > 0:
            caps[j] = 0
        elif st.probe:
            caps[j] = min(caps[j], 1)
            probes.append(j)
    # cum[j][m]: expected tokens gained by drafting m tokens (sum of survival products)
    cum = ctl.acceptance.gains(ids, explore=ctl.explore, kinds=[sched[i].kind for i in auto])
    base = [float(q[i]) for i in auto]
    ctxs = [float(ctx[i]) for i in auto]
    reuse = ctl.overlap.shares(ids, [sched[i].req.id for i in range(len(sched))])
    qs = q
    n = sum(qs)
    neff = sum(x ** beta for x in qs)
    attn = sum(a * b + a * (a + 1) / 2 for a, b in zip(qs, ctx)) / 1000.0
    drafting = sum(1 for f in fixed_k if f > 0)
    dtok = float(sum(fixed_k))
    depth = float(max(fixed_k, default=0))
    lag = sum(g for g, f in zip(lag_all, fixed_k) if f > 0)
    lags = [lag_all[i] for i in auto]
    fixed_t = c0 + c_seq * len(qs)
    # the local correction at this many sequences: + a + b (n - m), n held within [lo, hi] (router/local_fit.py)
    line = cost.local.line(len(qs), cost.c)
    la, lb, lm, llo, lhi = line if line is not None else (0.0, 0.0, 0.0, 0.0, 0.0)
    fixed_t += la

    def price(n_, neff_, attn_, drafting_, dtok_, depth_, lag_):
        t = (fixed_t + c_lin * n_ + c_bend * min(n_, knee) + exp_scale * distinct(neff_) + c_attn * attn_
             + lb * (min(max(n_, llo), lhi) - lm))
        if drafting_:
            t += d_any + d_seq * drafting_ + d_tok * dtok_ + d_depth * depth_ + d_lag * lag_
        return t

    def price_a(n_, neff_, attn_, drafting_, dtok_, depth_, lag_):
        """price over arrays of plans (the array searches; broadcast alike)."""
        t = (fixed_t + c_lin * n_ + c_bend * np.minimum(n_, knee) + exp_scale * distinct(neff_) + c_attn * attn_
             + lb * (np.clip(n_, llo, lhi) - lm))
        return t + np.where(drafting_ > 0, d_any + d_seq * drafting_ + d_tok * dtok_ + d_depth * depth_
                            + d_lag * lag_, 0.0)

    T = max(price(n, neff, attn, drafting, dtok, depth, lag), 1e-9)
    V = float(sampling)
    kk = [0] * len(ids)
    # Hedge by the model's recent error: a gain the model cannot tell from noise is not taken.
    mape = ctl.cost.trimmed_mape
    # The hedge guards the decision to draft at all (against "off"); a request already drafting
    # deepens at the plain margin: past the first draft an error in the price cuts both ways.
    hedged = 1.0 + ctl.margin + ctl.hedge * (mape if mape is not None else 0.1)
    plain = 1.0 + ctl.margin
    # The price of a second: what this step makes of it, or what recent steps did if that is
    # more (a prefill-heavy step's own rate undervalues the time its drafts would add).
    g_ref = ctl.goodput
    if ctl.goodput_by_batch and not ctl.goodput_is_of(sampling):
        g_ref = 0.0     # measured at another batch (the tail of one): this batch's decode step stands in
    if not g_ref:
        # No step measured yet (an engine's first): a prompt's prefill step's own rate is what its drafts
        # would be priced at otherwise (~90 tokens/s on the bundled pair, where it decodes at ~500, so its
        # first prefill drafted 8 that cannot pay); its sampled requests' decode step, as priced, stands in.
        dec = ctl.cost.target_features([1] * sampling, [s.req.num_cached + s.num_new - 1 for s in sched
                                                         if not s.partial])
        g_ref = sampling / max(ctl.cost.predict(dec, np.zeros(len(ctl.cost.d))), 1e-9)

    def grow(agg, j, k0, k1):
        """The plan's aggregates after request j drafts k1 instead of k0."""
        n_, neff_, attn_, drafting_, dtok_, depth_, lag_ = agg
        dk, b, first = k1 - k0, base[j] + k0, k0 == 0
        # tokens whose experts the rest of the step loads anyway add fewer new ones
        return (n_ + dk, neff_ + ((b + dk) ** beta - b ** beta) * (1.0 - reuse[j]),
                attn_ + (dk * (ctxs[j] + b) + dk * (dk + 1) / 2) / 1000.0, drafting_ + first, dtok_ + dk,
                max(depth_, k1), lag_ + (lags[j] if first else 0))

    def extension(j, kp):
        """(dv, dT, new aggregates) of request j drafting kp instead of kk[j]."""
        agg = grow((n, neff, attn, drafting, dtok, depth, lag), j, kk[j], kp)
        return cum[j][kp] - cum[j][kk[j]], price(*agg) - T, agg

    def search_scalar():
        cands = []
        for j in range(len(ids)):
            best, best_kp = 0.0, 0
            for kp in range(kk[j] + 1, caps[j] + 1):
                dv, dT, _ = extension(j, kp)
                if dv > max(V / T, g_ref) * max(dT, 0.0) * (plain if kk[j] else hedged):
                    r = dv / max(dT, 1e-12)
                    if r > best:
                        best, best_kp = r, kp
            if best_kp:
                cands.append((best, j, best_kp))
        return cands

    if len(ids) >= ctl.array_from:     # the same search over (request, depth) arrays
        B, KP = len(ids), np.arange(1, ctl.k_max + 1)
        cum_a, base_a, ctx_a = np.array(cum), np.array(base), np.array(ctxs)
        keep_a, lags_a, caps_a, rows_a = 1.0 - np.array(reuse), np.array(lags, dtype=float), np.array(caps), \
            np.arange(B)

        def search():
            kk_a = np.array(kk)
            dk = KP[None, :] - kk_a[:, None]
            valid = (dk > 0) & (KP[None, :] <= caps_a[:, None])
            if not valid.any():
                return []
            dk = np.maximum(dk, 0)
            b = base_a + kk_a
            neff_ = neff + ((b[:, None] + dk) ** beta - (b ** beta)[:, None]) * keep_a[:, None]
            attn_ = attn + (dk * (ctx_a + b)[:, None] + dk * (dk + 1) / 2) / 1000.0
            first = kk_a == 0
            t = price_a(n + dk, neff_, attn_, (drafting + first)[:, None], dtok + dk, np.maximum(depth, KP)[None, :],
                        (lag + lags_a * first)[:, None])
            dT = t - T
            dv = cum_a[:, 1:] - cum_a[rows_a, kk_a][:, None]
            margin_a = np.where(first, hedged, plain)[:, None]
            ok = valid & (dv > max(V / T, g_ref) * np.maximum(dT, 0.0) * margin_a)
            r = np.where(ok, dv / np.maximum(dT, 1e-12), -np.inf)
            bj = r.argmax(axis=1)
            br = r[rows_a, bj]
            return [(float(br[j]), int(j), int(bj[j]) + 1) for j in np.nonzero(br > 0)[0]]
        def uniform(g, factor, V, T):
            """The uniform-depth phase below on a (depth, request) array: every min(u, cap_i) plan's
            aggregates from the empty plan's, its price, and of those that pay, the fastest (or None)."""
            n0, neff0, attn0, drafting0, dtok0, depth0, lag0 = agg0
            K = np.minimum(np.arange(1, int(caps_a.max()) + 1)[:, None], caps_a[None, :])      # (depths, B)
            on = K > 0
            Kf = K.astype(float)
            n_u = n0 + Kf.sum(1)
            neff_u = neff0 + (((base_a + Kf) ** beta - base_a ** beta) * keep_a).sum(1)
            attn_u = attn0 + ((Kf * (ctx_a + base_a) + Kf * (Kf + 1) / 2) / 1000.0).sum(1)
            drafting_u = drafting0 + on.sum(1)
            dtok_u = dtok0 + Kf.sum(1)
            depth_u = np.maximum(depth0, Kf.max(1))
            lag_u = lag0 + (on * lags_a).sum(1)
            V_u = V0 + cum_a[rows_a[None, :], K].sum(1)
            T_u = np.maximum(price_a(n_u, neff_u, attn_u, drafting_u, dtok_u, depth_u, lag_u), 1e-9)
            gain = (V_u - V) - g * np.maximum(T_u - T, 0.0) * factor
            ok = (V_u > V) & (gain > 0) & ~(K == np.array(kk)[None, :]).all(1)
            if not ok.any():
                return None
            u = int(np.argmax(np.where(ok, V_u / T_u, -np.inf)))
            agg = (float(n_u[u]), float(neff_u[u]), float(attn_u[u]), int(drafting_u[u]), float(dtok_u[u]),
                   float(depth_u[u]), float(lag_u[u]))
            return (float(V_u[u] / T_u[u]), K[u].tolist(), agg, float(V_u[u]), float(T_u[u]))
    else:
        search = search_scalar
    agg0, V0, T0 = (n, neff, attn, drafting, dtok, depth, lag), V, T
    for phase in range(2):
        while True:
            cands = search()
            if not cands:
                break
            taken = 0
            for _, j, kp in sorted(cands, reverse=True):
                dv, dT, agg = extension(j, kp)
                if dv <= max(V / T, g_ref) * max(dT, 0.0) * (plain if kk[j] else hedged):
                    continue
                breakeven[ids[j]] = breakeven.get(ids[j], 0.0) + max(V / T, g_ref) * max(dT, 0.0)
                n, neff, attn, drafting, dtok, depth, lag = agg
                V += dv
                T += dT
                kk[j] = kp
                taken += 1
            if not taken:
                break
        if phase or len(ids) < 2:
            break
        # A concave price (the step's fixed part, experts that saturate, a token slope that falls past
        # the knee) can make every single request's extension look dear while all of them drafting
        # together pays: price every uniform depth as a whole plan and, of those that beat the greedy
        # plan by the same test, take the one of the highest goodput and climb on from it.
        g = max(V / T, g_ref)
        factor = plain if any(kk) else hedged
        best = uniform(g, factor, V, T) if len(ids) >= ctl.array_from else None
        for u in range(1, max(caps) + 1) if len(ids) < ctl.array_from else ():
            ku = [min(u, c) for c in caps]
            if ku == kk:
                continue
            agg, V_u = agg0, V0
            for j, kj in enumerate(ku):
                if kj:
                    agg = grow(agg, j, 0, kj)
                    V_u += cum[j][kj]
            T_u = max(price(*agg), 1e-9)
            gain = (V_u - V) - g * max(T_u - T, 0.0) * factor
            if V_u > V and gain > 0 and (best is None or V_u / T_u > best[0]):     # the fastest that pays
                best = (V_u / T_u, ku, agg, V_u, T_u)
        if best is None:
            break
        _, ku, agg, V_u, T_u = best
        m = sum(1 for v in ku if v)
        breakeven.clear()
        for j, kj in enumerate(ku):
            if kj:
                breakeven[ids[j]] = g * max(T_u - T0, 0.0) / m
        kk[:] = ku
        n, neff, attn, drafting, dtok, depth, lag = agg
        V, T = V_u, T_u
    for j, rid in enumerate(ids):          # did a past probe find drafting pays? sets new requests' interval
        st = ctl._state[rid]
        if st.probed:
            st.probed = False
            ctl.start_backoff = (max(8, ctl.start_backoff // 2) if kk[j] else
                                  min(ctl.start_backoff * 2, ctl.max_backoff))
    for j in probes:                       # a probe drafts one token even where the plan would not
        if caps[j] and not kk[j]:
            dv, dT, agg = extension(j, 1)
            n, neff, attn, drafting, dtok, depth, lag = agg
            T += dT
            kk[j] = 1
    for j, i in enumerate(auto):
        k[i] = kk[j]
    return (V / max(T, 1e-12)) / max(V0 / max(T0, 1e-12), 1e-12)


def first_draft_loss(ctl, sched, probe_k: dict, q, ctx, lag) -> float:
    """The priced goodput lost by the entries of probe_k {index: drafts} drafting those (one each) against
    none, 1 - (V1 / T1) / (V0 / T0), acceptance as estimated without the exploration bonus: whether a draft
    probe (the controller's `draft_probe_every`) is cheap enough to run."""
    auto = list(probe_k)
    ids = [sched[i].req.id for i in auto]
    a0 = ctl.acceptance.estimate(ids, kinds=[sched[i].kind for i in auto])[:, 0]
    k1 = [0] * len(sched)
    for i in auto:
        k1[i] = probe_k[i]
    q1 = [x + d for x, d in zip(q, k1)]
    sampling = sum(1 for s in sched if not s.partial)
    t0 = ctl.cost.predict(ctl.cost.target_features(q, ctx), ctl.cost.draft_features([0] * len(sched)))
    t1 = ctl.cost.predict(ctl.cost.target_features(q1, ctx), ctl.cost.draft_features(k1, lag))
    v1 = sampling + float(sum(a for a, i in zip(a0, auto) if k1[i]))
    return 1.0 - (v1 / max(t1, 1e-12)) / (sampling / max(t0, 1e-12))
