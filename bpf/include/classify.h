/* classify.h - the first-match classifier: per-field lookups -> class bit-vectors -> AND ->
 * first set bit, plus count rules, rate limiting and counters. Declares its maps, so every
 * program that includes it (XDP ingress, TC egress) gets its own set.
 * Not a parser (parse.h) and not an attach point: it returns NB_ACT_ALLOW or NB_ACT_DROP. */
#ifndef NETBPF_CLASSIFY_H
#define NETBPF_CLASSIFY_H

#include "netbpf_abi.h"
#include "parse.h"

BPF_ARRAY(nb_fw_gen, struct nb_gen, 1);
BPF_ARRAY(nb_fw_cfg, struct nb_fw_cfg, 2);
BPF_ARRAY(nb_fw_rules, struct nb_rule, 2 * NB_RULES_CAP);
BPF_ARRAY(nb_fw_crules, __u32, 2 * NB_MAX_COUNT_RULES);
BPF_ARRAY(nb_fw_vecs, struct nb_vec, 2 * NB_CLASS_CAP);
BPF_ARRAY(nb_fw_dir, __u32, 2 * NB_DIR_GEN);
BPF_ARRAY(nb_fw_pair, struct nb_psum, 2 * NB_PAIR_CELLS);
BPF_ARRAY(nb_fw_ports, __u32, 4 * 65536);
BPF_ARRAY(nb_fw_proto, __u32, 2 * 256);
BPF_ARRAY(nb_fw_icmp, __u32, 2 * 65536);
BPF_ARRAY(nb_fw_flags, __u32, 2 * 256);
BPF_LPM_TRIE(nb_set4, struct nb_lpm4_key, __u32, 2 * NB_SET_CAP);
BPF_LPM_TRIE(nb_set6, struct nb_lpm6_key, __u32, 2 * NB_SET_CAP);
/* sets of full-length addresses: one hash lookup; not preallocated, so an unused map costs
 * no kernel memory (a preallocated 2M-entry hash would pin ~100 MB per program) */
BPF_F_TABLE("hash", struct nb_seth4_key, __u32, nb_seth4, 2 * NB_SET_CAP, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct nb_seth6_key, __u32, nb_seth6, 2 * NB_SET_CAP, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(nb_fw_cnt, struct nb_counter, NB_SLOT_CAP);
BPF_PERCPU_ARRAY(nb_fw_stats, struct nb_counter, NB_STAT_MAX);
BPF_TABLE("lru_hash", struct nb_rl_key, struct nb_rl_state, nb_fw_rl, NB_RL_ENTRIES);
BPF_RINGBUF_OUTPUT(nb_fw_events, NB_EVENTS_PAGES);

/* Count trailing zeros of x != 0 without branches: popcount((x & -x) - 1), SWAR style.
 * bcc 0.26 crashes on __builtin_ctzll, and a branchy version multiplies verifier states
 * (each branch doubles the paths through the scan loop). The & 63 gives the verifier a bound. */
static __always_inline __u32 nb_ctz64(__u64 x)
{
    __u64 y = (x & -x) - 1;
    y = y - ((y >> 1) & 0x5555555555555555ULL);
    y = (y & 0x3333333333333333ULL) + ((y >> 2) & 0x3333333333333333ULL);
    y = (y + (y >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (__u32)((y * 0x0101010101010101ULL) >> 56) & 63;
}

static __always_inline void nb_bump(struct nb_counter *c, __u32 len, int dropped)
{
    if (c) {
        c->packets += 1;
        c->bytes += len;
        if (dropped)
            c->drops += 1;
    }
}

static __always_inline void nb_count(__u32 slot, __u32 len, int dropped)
{
    struct nb_counter *c = nb_fw_cnt.lookup(&slot);   /* bcc: no map call inside an argument */
    nb_bump(c, len, dropped);
}

/* One in `sample` packets becomes an event; a full ring buffer loses the event, never the
 * packet. */
static __always_inline void nb_sample(struct nb_pkt *p, __u32 sample, __u32 slot, __u32 len,
                                      int act, int rate_limited)
{
    if (!sample || (sample > 1 && bpf_get_prandom_u32() % sample))
        return;
    struct nb_event ev = {.ts_ns = bpf_ktime_get_ns(), .slot = slot, .len = len,
                          .action = act, .rate_limited = rate_limited, .family = p->family,
                          .proto = p->proto};
    if (p->has_ports) {
        ev.sport = p->sport;
        ev.dport = p->dport;
    }
    __builtin_memcpy(ev.src, p->src, 16);
    __builtin_memcpy(ev.dst, p->dst, 16);
    nb_fw_events.ringbuf_output(&ev, sizeof(ev), 0);
}

static __always_inline void nb_stat(__u32 idx, __u32 len)
{
    struct nb_counter *c = nb_fw_stats.lookup(&idx);
    nb_bump(c, len, 0);
}

/* Class id of an address field: the longest rule prefix holding the address, read from the
 * direct-indexed tables (one root read by the first 16 bits, then one chunk read per further
 * byte while the entry points deeper): at most 3 reads for IPv4, 15 for IPv6, whatever the
 * number of prefixes. A real (bounded) loop, not unrolled: unrolled, each step's key got its
 * own stack slot and a program with conntrack went over the 512-byte stack. */
static __always_inline __u32 nb_addr_class(struct nb_pkt *p, __u32 gen, __u32 field,
                                           __u8 *addr, __u32 wild)
{
    __u32 nbytes = p->family == 4 ? 4 : 16;
    __u32 base = gen * NB_DIR_GEN;
    __u32 idx = base + ((field << 1) | (p->family != 4)) * NB_DIR_ROOT +
                (((__u32)addr[0] << 8) | addr[1]);
    __u32 *e = nb_fw_dir.lookup(&idx);
    if (!e)
        return wild;
    __u32 v = *e;
    for (__u32 i = 2; i < 16; i++) {
        if (i >= nbytes || !(v & NB_DIR_PTR))
            break;
        __u32 chunk = v & ~NB_DIR_PTR;
        if (chunk >= NB_DIR_CHUNKS)
            return wild;
        idx = base + 4 * NB_DIR_ROOT + chunk * 256 + addr[i & 15];
        e = nb_fw_dir.lookup(&idx);
        if (!e)
            return wild;
        v = *e;
    }
    return (v & NB_DIR_PTR) ? wild : v;
}

/* Spelled out per map: bcc only rewrites map.lookup() on a map named in place, and a plain
 * bpf_map_lookup_elem() lets clang hoist the helper address into a register (callx, which the
 * kernel rejects as "unknown opcode 8d"). */
static __always_inline __u32 nb_proto_class(__u32 idx, __u32 wild)
{
    __u32 *id = nb_fw_proto.lookup(&idx);
    return id ? *id : wild;
}

static __always_inline __u32 nb_port_class(__u32 idx, __u32 wild)
{
    __u32 *id = nb_fw_ports.lookup(&idx);
    return id ? *id : wild;
}

static __always_inline __u32 nb_icmp_class(__u32 idx, __u32 wild)
{
    __u32 *id = nb_fw_icmp.lookup(&idx);
    return id ? *id : wild;
}

static __always_inline __u32 nb_flags_class(__u32 idx, __u32 wild)
{
    __u32 *id = nb_fw_flags.lookup(&idx);
    return id ? *id : wild;
}

static __always_inline int nb_in_set(struct nb_pkt *p, __u32 tag, __u32 field)
{
    __u8 *addr = (field & 0xff) == NB_F_SRC ? p->src : p->dst;
    if (p->family == 4 && (field & NB_SETREF_HASH4)) {
        struct nb_seth4_key h = {.tag = tag};
        __builtin_memcpy(h.addr, addr, 4);
        __u32 *hh4 = nb_seth4.lookup(&h);
        return hh4 != 0;
    }
    if (p->family == 6 && (field & NB_SETREF_HASH6)) {
        struct nb_seth6_key h = {.tag = tag};
        __builtin_memcpy(h.addr, addr, 16);
        __u32 *hh6 = nb_seth6.lookup(&h);
        return hh6 != 0;
    }
    if (p->family == 4) {
        struct nb_lpm4_key k = {.prefixlen = 64, .tag = tag};
        __builtin_memcpy(k.addr, addr, 4);
        __u32 *hit4 = nb_set4.lookup(&k);
        return hit4 != 0;
    }
    struct nb_lpm6_key k = {.prefixlen = 160, .tag = tag};
    __builtin_memcpy(k.addr, addr, 16);
    __u32 *hit6 = nb_set6.lookup(&k);
    return hit6 != 0;
}

static __always_inline __u32 nb_setref_class(struct nb_pkt *p, struct nb_fw_cfg *cfg, __u32 k)
{
    if (k >= cfg->nsetrefs || k >= NB_MAX_SETREFS)
        return NB_CLASS_ALL;
    struct nb_setref *r = &cfg->setref[k];
    return nb_in_set(p, r->tag, r->field) ? r->member_id : r->nonmember_id;
}

/* The summary of the packet's cell in pair table k (netbpf_abi.h, struct nb_pair_cfg), or 0:
 * the table is not used in this generation (or a class is outside its range: the scan then
 * runs without it). Table 0 pairs the source and destination; table 1 an address field (which
 * one: its cfg) and the destination port. */
static __always_inline struct nb_psum *nb_pair_of(struct nb_pair_cfg *pc, __u32 first,
                                                  __u32 gen, __u32 a, __u32 b, __u32 cap)
{
#if NB_PAIR_CELLS > 1
    if (!pc->on)
        return 0;
    __u32 ra = a - pc->base[0];
    __u32 rb = b - pc->base[1];
    if (ra >= pc->n[0] || rb >= pc->n[1])
        return 0;
    __u32 cell = (ra >> (pc->shift[0] & 31)) * pc->cols + (rb >> (pc->shift[1] & 31));
    __u32 idx = gen * NB_PAIR_CELLS + first + (cell & (cap - 1));
    return nb_fw_pair.lookup(&idx);
#else
    return 0;
#endif
}

static __always_inline struct nb_vec *nb_vec_of(__u32 gen, __u32 id)
{
    /* NB_CLASS_CAP is a power of two: the mask keeps a corrupt id inside this generation */
    __u32 idx = gen * NB_CLASS_CAP + (id & (NB_CLASS_CAP - 1));
    return nb_fw_vecs.lookup(&idx);
}

/* Token bucket in nanopackets. Approximate under contention between CPUs (no lock): a few
 * packets over the burst at worst, never a stuck bucket. */
static __always_inline int nb_rate_ok(struct nb_rule *r, struct nb_pkt *p)
{
    struct nb_rl_key k = {.slot = r->slot};
    if (r->rl_per == NB_RL_PER_SRC) {
        k.family = p->family;
        __builtin_memcpy(k.addr, p->src, 16);
    }
    __u64 now = bpf_ktime_get_ns();
    __u64 cap = r->rl_burst * 1000000000ULL;
    struct nb_rl_state *st = nb_fw_rl.lookup(&k);
    if (!st) {
        struct nb_rl_state init = {.tokens = cap - 1000000000ULL, .last_ns = now};
        nb_fw_rl.update(&k, &init);
        return 1;
    }
    __u64 elapsed = now - st->last_ns;
    if (elapsed > 10000000000ULL)   /* 10 s refills any bucket; keeps elapsed*rate from overflow */
        elapsed = 10000000000ULL;
    __u64 tokens = st->tokens + elapsed * r->rl_rate;
    if (tokens > cap)
        tokens = cap;
    int ok = tokens >= 1000000000ULL;
    if (ok)
        tokens -= 1000000000ULL;
    st->tokens = tokens;
    st->last_ns = now;
    return ok;
}

/* NB_FIELDS: fields compiled in (bit f = field f, NB_F_SET0 + k = set reference k). The
 * controller builds the program with the fields its policy uses, so an unused field costs no
 * lookup and no load per packet; a policy that starts using another field gets a new program. */
#ifndef NB_FIELDS
#define NB_FIELDS ((1 << NB_NFIELDS) - 1)
#endif
#define NB_HAS(f) (((NB_FIELDS) >> (f)) & 1)
#define NB_T(k, member, i) (NB_HAS(k) ? v##k->member[i] : ~0ULL)
#define NB_TC(k) (NB_HAS(k) ? v##k->count : ~0ULL)
#define NB_AND(member, i)                                                              \
    (NB_T(0, member, i) & NB_T(1, member, i) & NB_T(2, member, i) & NB_T(3, member, i) &  \
     NB_T(4, member, i) & NB_T(5, member, i) & NB_T(6, member, i) & NB_T(7, member, i) &  \
     NB_T(8, member, i) & NB_T(9, member, i) & NB_T(10, member, i))
/* The same AND without the source, destination and destination-port fields: their summaries
 * are ANDed through the pair tables when a generation has them (nb_classify). */
#define NB_AND_REST(member, i)                                                         \
    (NB_T(2, member, i) & NB_T(3, member, i) & NB_T(5, member, i) & NB_T(6, member, i) &  \
     NB_T(7, member, i) & NB_T(8, member, i) & NB_T(9, member, i) & NB_T(10, member, i))
#define NB_VEC(k) struct nb_vec *v##k = NB_HAS(k) ? nb_vec_of(gen, id[k]) : 0

/* Count rules a packet matched, counted by nb_count_rules() as the program's very last step:
 * the loop's exits each reach the code after it in a different state, and the verifier would
 * re-check all of that code (the load balancer) once per exit. */
struct nb_pending {
    __u64 counted;
    __u32 gen;
};

static __always_inline void nb_count_rules(struct nb_pending *pend, __u32 len)
{
    __u64 counted = pend->counted;
    __u32 gen = pend->gen & 1;
    for (int c = 0; c < NB_MAX_COUNT_RULES; c++) {
        if (!counted)
            break;
        __u32 ci = gen * NB_MAX_COUNT_RULES + nb_ctz64(counted);
        counted &= counted - 1;
        __u32 *slot = nb_fw_crules.lookup(&ci);
        if (slot)
            nb_count(*slot, len, 0);
    }
}

/* Classify a parsed packet; count it (count rules: see nb_pending); return NB_ACT_ALLOW,
 * NB_ACT_DROP or NB_ACT_REJECT. */
static __always_inline int nb_classify(struct nb_pkt *p, __u32 len, struct nb_pending *pend)
{
    pend->counted = 0;
    __u32 zero = 0;
    struct nb_gen *g = nb_fw_gen.lookup(&zero);
    if (!g)
        return NB_ACT_ALLOW;
    __u32 gen = g->gen & 1;     /* read once: this packet sees one generation, whole */
    struct nb_fw_cfg *cfg = nb_fw_cfg.lookup(&gen);
    if (!cfg)
        return NB_ACT_ALLOW;
    __u32 mask = cfg->field_mask;

    __u32 id[NB_NFIELDS];
#pragma unroll
    for (int f = 0; f < NB_NFIELDS; f++)
        id[f] = NB_CLASS_ALL;
    if (NB_HAS(NB_F_SRC) && (mask & (1 << NB_F_SRC)))
        id[NB_F_SRC] = nb_addr_class(p, gen, NB_F_SRC, p->src, cfg->wild_id[NB_F_SRC]);
    if (NB_HAS(NB_F_DST) && (mask & (1 << NB_F_DST)))
        id[NB_F_DST] = nb_addr_class(p, gen, NB_F_DST, p->dst, cfg->wild_id[NB_F_DST]);
    if (NB_HAS(NB_F_PROTO) && (mask & (1 << NB_F_PROTO)))
        id[NB_F_PROTO] = nb_proto_class(NB_PROTO_IDX(gen, p->proto),
                                        cfg->wild_id[NB_F_PROTO]);
    if (NB_HAS(NB_F_SPORT) && (mask & (1 << NB_F_SPORT)))
        id[NB_F_SPORT] = p->has_ports ?
            nb_port_class(NB_PORT_IDX(gen, 0, p->sport), cfg->wild_id[NB_F_SPORT]) :
            cfg->wild_id[NB_F_SPORT];
    if (NB_HAS(NB_F_DPORT) && (mask & (1 << NB_F_DPORT)))
        id[NB_F_DPORT] = p->has_ports ?
            nb_port_class(NB_PORT_IDX(gen, 1, p->dport), cfg->wild_id[NB_F_DPORT]) :
            cfg->wild_id[NB_F_DPORT];
    if (NB_HAS(NB_F_ICMP) && (mask & (1 << NB_F_ICMP)))
        id[NB_F_ICMP] = p->has_icmp ?
            nb_icmp_class(NB_ICMP_IDX(gen, ((__u32)p->icmp_type << 8) | p->icmp_code),
                           cfg->wild_id[NB_F_ICMP]) :
            cfg->wild_id[NB_F_ICMP];
    if (NB_HAS(NB_F_FLAGS) && (mask & (1 << NB_F_FLAGS)))
        id[NB_F_FLAGS] = p->has_flags ?
            nb_flags_class(NB_FLAGS_IDX(gen, p->tcp_flags), cfg->wild_id[NB_F_FLAGS]) :
            cfg->wild_id[NB_F_FLAGS];
#pragma unroll
    for (int k = 0; k < NB_MAX_SETREFS; k++)
        if (NB_HAS(NB_F_SET0 + k))
            id[NB_F_SET0 + k] = nb_setref_class(p, cfg, k);

    NB_VEC(0); NB_VEC(1); NB_VEC(2); NB_VEC(3); NB_VEC(4); NB_VEC(5);
    NB_VEC(6); NB_VEC(7); NB_VEC(8); NB_VEC(9); NB_VEC(10);
    if ((NB_HAS(0) && !v0) || (NB_HAS(1) && !v1) || (NB_HAS(2) && !v2) || (NB_HAS(3) && !v3) ||
        (NB_HAS(4) && !v4) || (NB_HAS(5) && !v5) || (NB_HAS(6) && !v6) || (NB_HAS(7) && !v7) ||
        (NB_HAS(8) && !v8) || (NB_HAS(9) && !v9) || (NB_HAS(10) && !v10))
        return NB_ACT_ALLOW;

    __u64 counted = NB_TC(0) & NB_TC(1) & NB_TC(2) & NB_TC(3) & NB_TC(4) & NB_TC(5) &
                    NB_TC(6) & NB_TC(7) & NB_TC(8) & NB_TC(9) & NB_TC(10);
    if (cfg->ncount < 64)
        counted &= (1ULL << cfg->ncount) - 1;

    /* Aggregated bit-vector scan: summary words name the rule words worth ANDing, so a
     * packet that matches nothing, or matches early, touches few words whatever the rule count.
     * The pair summaries (when the generation has them) drop the words where no rule takes
     * both values: on dense rule sets the fields' own summaries are nearly all ones. */
    struct nb_psum *ps0 = nb_pair_of(&cfg->pair[0], 0, gen, id[NB_F_SRC], id[NB_F_DST],
                                     NB_PAIR0_CELLS);
    struct nb_psum *ps1 = nb_pair_of(&cfg->pair[1], NB_PAIR0_CELLS, gen,
                                     cfg->pair[1].field[0] == NB_F_SRC ? id[NB_F_SRC] : id[NB_F_DST],
                                     id[NB_F_DPORT], NB_PAIR1_CELLS);
    __u32 t = 0xffffffff;
#pragma unroll
    for (__u32 s = 0; s < NB_SUM; s++) {
        if (s * 64 * 64 >= cfg->nrules)
            break;                      /* no rule of this generation past here */
        /* a pair's summary stands in for its fields' own (the words it names are those the
         * fields' summaries share, or a few more when grouped: never fewer) */
        __u64 ws = NB_AND_REST(sum, s);
        ws &= ps0 ? ps0->sum[s] : NB_T(0, sum, s) & NB_T(1, sum, s);
        ws &= ps1 ? ps1->sum[s] : NB_T(4, sum, s);
        for (int j = 0; j < 64; j++) {
            if (ws == 0)
                break;
            __u32 wi = s * 64 + nb_ctz64(ws);
            ws &= ws - 1;
            if (wi >= NB_WORDS)
                break;
            wi &= NB_WORDS - 1;     /* no-op (NB_WORDS is a power of two); bounds it for the verifier */
            __u64 bits = NB_AND(w, wi);
            if (bits) {
                t = wi * 64 + nb_ctz64(bits);
                goto scanned;
            }
        }
    }
scanned:;

    int act = cfg->default_action == NB_ACT_DROP ? NB_ACT_DROP : NB_ACT_ALLOW;
    int rate_dropped = 0;
    struct nb_rule *r = 0;
    if (t < cfg->nrules) {
        __u32 ridx = gen * NB_RULES_CAP + t;
        r = nb_fw_rules.lookup(&ridx);
    }
    if (r) {
        counted &= r->count_mask;
        if (r->action == NB_ACT_DROP || r->action == NB_ACT_REJECT) {
            act = r->action;            /* reject: a drop the action stage answers (reject.h) */
        } else if (r->action == NB_ACT_RATE) {
            act = nb_rate_ok(r, p) ? NB_ACT_ALLOW : NB_ACT_DROP;
            rate_dropped = act == NB_ACT_DROP;
        } else {
            act = NB_ACT_ALLOW;
        }
        nb_count(r->slot, len, rate_dropped);
        nb_sample(p, r->sample, r->slot, len, act, rate_dropped);
    } else {
        nb_stat(NB_STAT_DEFAULT, len);
        nb_sample(p, cfg->default_sample, NB_EVENT_DEFAULT, len, act, 0);
    }

    pend->counted = counted;
    pend->gen = gen;

    if (rate_dropped)
        nb_stat(NB_STAT_RATE_DROP, len);
    if (p->fragment)
        nb_stat(NB_STAT_FRAGMENT, len);
    nb_stat(act == NB_ACT_ALLOW ? NB_STAT_PASS : NB_STAT_DROP, len);
    return act;
}

#endif
