/* conntrack.h - "deny inbound, allow established": egress records connections this side
 * starts, ingress lets their replies through. Not a full tracker: no sequence checking, no
 * related flows (ICMP errors), no NAT. The first program loaded creates nb_ct; programs built
 * with -DNB_SHARED_PIN="dir" open (or create and pin) dir/nb_ct, so both share one table. */
#ifndef NETBPF_CONNTRACK_H
#define NETBPF_CONNTRACK_H

#include "netbpf_abi.h"
#include "parse.h"

#ifdef NB_SHARED_PIN
BPF_TABLE_PINNED("lru_hash", struct nb_ct_key, struct nb_ct_val, nb_ct, NB_CT_ENTRIES,
                 NB_SHARED_PIN "/nb_ct");
BPF_TABLE_PINNED("array", __u32, struct nb_ct_cfg, nb_ct_cfg, 1, NB_SHARED_PIN "/nb_ct_cfg");
#else
BPF_TABLE("lru_hash", struct nb_ct_key, struct nb_ct_val, nb_ct, NB_CT_ENTRIES);
BPF_ARRAY(nb_ct_cfg, struct nb_ct_cfg, 1);
#endif

#define NB_TCP_FIN 0x01
#define NB_TCP_SYN 0x02
#define NB_TCP_RST 0x04
#define NB_TCP_ACK 0x10

/* Linux conntrack's tcp_valid_flags: over FIN SYN RST ACK URG (PSH ECE CWR ignored) these
 * combinations are the only ones a connection carries; any other is INVALID. Such a packet
 * is never let through as a reply: it meets the rules, where 'ct: invalid' can drop it (the
 * rule itself is lowered to TCP-flag matches by netbpf/policy/convert.py). */
static __always_inline int nb_ct_tcp_flags_valid(__u8 flags)
{
    switch (flags & 0x37) {
    case 0x02: case 0x22: case 0x12: case 0x04: case 0x14:
    case 0x11: case 0x31: case 0x10: case 0x30:
        return 1;
    }
    return 0;
}

/* Key of the connection p belongs to, oriented as it went out (reply: swap). 0: untracked. */
static __always_inline int nb_ct_key_of(struct nb_pkt *p, struct nb_ct_key *k, int reply)
{
    if (p->fragment)
        return 0;
    k->family = p->family;
    k->proto = p->proto;
    if (p->has_ports) {
        k->sport = reply ? p->dport : p->sport;
        k->dport = reply ? p->sport : p->dport;
    } else if (p->has_icmp_id) {
        k->sport = p->icmp_id;      /* the echo identifier names the "connection" both ways */
    } else {
        return 0;
    }
    if (reply) {
        __builtin_memcpy(k->saddr, p->dst, 16);
        __builtin_memcpy(k->daddr, p->src, 16);
    } else {
        __builtin_memcpy(k->saddr, p->src, 16);
        __builtin_memcpy(k->daddr, p->dst, 16);
    }
    return 1;
}

static __always_inline __u64 nb_ct_timeout(struct nb_ct_val *v, __u8 proto)
{
    __u32 zero = 0;
    struct nb_ct_cfg *cfg = nb_ct_cfg.lookup(&zero);
    if (!cfg)
        return 0;
    if (proto == IPPROTO_TCP) {
        if (v->state == NB_CT_SYN_SENT)
            return cfg->timeout_ns[NB_CT_T_TCP_SYN];
        if (v->state == NB_CT_CLOSING)
            return cfg->timeout_ns[NB_CT_T_TCP_CLOSE];
        return cfg->timeout_ns[NB_CT_T_TCP_EST];
    }
    if (proto == IPPROTO_UDP)
        return cfg->timeout_ns[NB_CT_T_UDP];
    return cfg->timeout_ns[NB_CT_T_ICMP];
}

/* Egress: a connection this side starts (TCP SYN, any UDP, ICMP echo request) gets an entry;
 * later packets refresh it. TCP without a SYN is not adopted: it may answer an inbound flow. */
static __always_inline void nb_ct_egress(struct nb_pkt *p)
{
    struct nb_ct_key k = {};
    if (!nb_ct_key_of(p, &k, 0))
        return;
    if (p->has_icmp_id && p->icmp_type != 8 && p->icmp_type != 128)
        return;
    __u64 now = bpf_ktime_get_ns();
    struct nb_ct_val *v = nb_ct.lookup(&k);
    __u8 fl = p->tcp_flags;
    if (v) {
        v->last_ns = now;
        v->packets += 1;
        if (p->proto == IPPROTO_TCP && (fl & (NB_TCP_FIN | NB_TCP_RST)))
            v->state = NB_CT_CLOSING;
        return;
    }
    struct nb_ct_val nv = {.last_ns = now, .packets = 1, .state = NB_CT_ESTABLISHED};
    if (p->proto == IPPROTO_TCP) {
        if ((fl & (NB_TCP_SYN | NB_TCP_ACK | NB_TCP_RST)) != NB_TCP_SYN)
            return;
        nv.state = NB_CT_SYN_SENT;
    }
    nb_ct.update(&k, &nv);
}

/* Ingress: 1 if p answers a live tracked connection (and advance its TCP state), else 0. */
static __always_inline int nb_ct_ingress(struct nb_pkt *p)
{
    struct nb_ct_key k = {};
    if (!nb_ct_key_of(p, &k, 1))
        return 0;
    if (p->proto == IPPROTO_TCP && !nb_ct_tcp_flags_valid(p->tcp_flags))
        return 0;
    if (p->has_icmp_id && p->icmp_type != 0 && p->icmp_type != 129)
        return 0;
    struct nb_ct_val *v = nb_ct.lookup(&k);
    if (!v)
        return 0;
    __u64 now = bpf_ktime_get_ns();
    if (now - v->last_ns > nb_ct_timeout(v, p->proto)) {
        nb_ct.delete(&k);
        return 0;
    }
    __u8 fl = p->tcp_flags;
    if (p->proto == IPPROTO_TCP) {
        if (fl & NB_TCP_RST) {
            nb_ct.delete(&k);       /* the reset itself still gets through */
            return 1;
        }
        if (v->state == NB_CT_SYN_SENT && (fl & (NB_TCP_SYN | NB_TCP_ACK)) == (NB_TCP_SYN | NB_TCP_ACK))
            v->state = NB_CT_ESTABLISHED;
        else if (fl & NB_TCP_FIN)
            v->state = NB_CT_CLOSING;
    }
    v->last_ns = now;
    v->packets += 1;
    return 1;
}

#endif
