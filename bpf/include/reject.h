/* reject.h - turn a packet a 'reject' rule matched into its refusal, in place: a TCP RST for
 * TCP, ICMP port unreachable (ICMPv6 port unreachable) otherwise, addressed back to the sender
 * with correct checksums. The caller sends it: XDP_TX on ingress, bpf_redirect from TC.
 * Not a classifier (classify.h decides) and not a parser (parse.h). Generation is bounded by
 * one token bucket (NB_REJECT_PPS / NB_REJECT_BURST, shared by all CPUs): past it, plain drop,
 * as Linux rate-limits its own ICMP errors. */
#ifndef NETBPF_REJECT_H
#define NETBPF_REJECT_H

#include "netbpf_abi.h"
#include "parse.h"

struct nb_reject_bucket {
    __u64 tokens;               /* scaled by NB_REJECT_SCALE */
    __u64 last_ns;
};
BPF_ARRAY(nb_reject_rl, struct nb_reject_bucket, 1);

#define NB_REJECT_SCALE 1000000ULL

/* 1 if one more reply may be sent now. Races between CPUs can let a few extra through;
 * the bound stays burst + rate x time, give or take the number of CPUs. */
static __always_inline int nb_reject_allowed(void)
{
    __u32 zero = 0;
    struct nb_reject_bucket *b = nb_reject_rl.lookup(&zero);
    if (!b)
        return 0;
    __u64 now = bpf_ktime_get_ns();
    __u64 cap = (__u64)NB_REJECT_BURST * NB_REJECT_SCALE;
    __u64 tokens = b->tokens;
    if (b->last_ns == 0)
        tokens = cap;
    else {
        __u64 dt = now - b->last_ns;
        if (dt > 1000000000ULL)
            dt = 1000000000ULL;     /* a second refills more than the burst anyway */
        tokens += dt * NB_REJECT_PPS * NB_REJECT_SCALE / 1000000000ULL;
        if (tokens > cap)
            tokens = cap;
    }
    b->last_ns = now;
    if (tokens < NB_REJECT_SCALE) {
        b->tokens = tokens;
        return 0;
    }
    b->tokens = tokens - NB_REJECT_SCALE;
    return 1;
}

/* Variable-length packet copies go through these helpers (kernel >= 5.18); declared here
 * under our own names so bcc's own declarations, where present, do not clash. */
static long (*nb_xdp_load_bytes)(void *ctx, __u32 off, void *buf, __u32 len) =
    (void *)BPF_FUNC_xdp_load_bytes;
static long (*nb_xdp_store_bytes)(void *ctx, __u32 off, void *buf, __u32 len) =
    (void *)BPF_FUNC_xdp_store_bytes;

/* What the reply needs from the original, read before the packet is resized. */
struct nb_reject_plan {
    __u32 l3_off;
    __u32 new_len;              /* length of the reply frame */
    __u32 quote;                /* ICMP: original bytes from its L3 header on (4-64, x4) */
    __u32 seq, ack_seq;         /* TCP: network order */
    __u8 tcp;                   /* 1: RST, 0: ICMP */
    __u8 rst_flags;
};

#define NB_L2_MAX (14 + 4 * NB_MAX_VLANS)
#define NB_IP4_HDR 20
#define NB_IP6_HDR 40
#define NB_TCP_HDR 20
#define NB_ICMP_HDR 8

static __always_inline int nb_is_icmp_error(struct nb_pkt *p)
{
    if (p->proto == IPPROTO_ICMP)
        return p->icmp_type == 3 || p->icmp_type == 4 || p->icmp_type == 5 ||
               p->icmp_type == 11 || p->icmp_type == 12;
    if (p->proto == NB_IPPROTO_ICMPV6)
        return p->icmp_type < 128;
    return 0;
}

/* 0 and a plan when a reply should go; -1 when the packet must only be dropped (a RST, an
 * ICMP error, a non-first fragment, a multicast or broadcast address, or over the budget). */
static __always_inline int nb_reject_plan(void *data, void *data_end, struct nb_pkt *p,
                                          struct nb_reject_plan *rp)
{
    __u32 l3 = p->l3_off;
    if (l3 > NB_L2_MAX || p->fragment || nb_is_icmp_error(p))
        return -1;
    if (p->family == 4) {
        if (p->dst[0] >= 224 || p->src[0] >= 224 || p->src[0] == 0)
            return -1;
    } else if (p->dst[0] == 0xff || p->src[0] == 0xff) {
        return -1;
    }
    __u32 iph = p->family == 4 ? NB_IP4_HDR : NB_IP6_HDR;
    rp->l3_off = l3;
    rp->tcp = p->proto == IPPROTO_TCP && p->has_flags;
    if (rp->tcp) {
        if (p->tcp_flags & 0x04)            /* never answer a RST */
            return -1;
        __u32 l4 = p->l4_off;
        if (l4 > 1024)                      /* parse.h never goes further; bounds the offset */
            return -1;
        struct tcphdr *th = data + l4;
        if ((void *)(th + 1) > data_end)
            return -1;
        __u32 l3_len;
        if (p->family == 4) {
            struct iphdr *ip = data + l3;
            if ((void *)(ip + 1) > data_end)
                return -1;
            l3_len = bpf_ntohs(ip->tot_len);
        } else {
            struct ipv6hdr *ip6 = data + l3;
            if ((void *)(ip6 + 1) > data_end)
                return -1;
            l3_len = bpf_ntohs(ip6->payload_len) + NB_IP6_HDR;
        }
        __u32 hdrs = l4 - l3 + th->doff * 4;
        __u32 payload = l3_len > hdrs ? l3_len - hdrs : 0;
        if (th->ack) {
            rp->seq = th->ack_seq;
            rp->ack_seq = 0;
            rp->rst_flags = 0x04;
        } else {
            rp->seq = 0;
            rp->ack_seq = bpf_htonl(bpf_ntohl(th->seq) + th->syn + th->fin + payload);
            rp->rst_flags = 0x14;
        }
        rp->new_len = l3 + iph + NB_TCP_HDR;
    } else {
        __u32 avail = (__u32)(data_end - data) - l3;
        __u32 q = avail < NB_REJECT_QUOTE ? avail : NB_REJECT_QUOTE;
        rp->quote = q & ~3U;
        if (rp->quote < 4)
            return -1;
        rp->new_len = l3 + iph + NB_ICMP_HDR + rp->quote;
    }
    return nb_reject_allowed() ? 0 : -1;
}

static __always_inline __u32 nb_fold(__u32 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return sum;
}

/* Sum of n (a constant) 16-bit words from start, read as stored (network order); the caller
 * has bounds-checked all of them. No branches: the verifier walks this once. */
#define NB_SUM_WORDS(start, n, sum)                                                 \
    do {                                                                            \
        __u16 *w_ = (__u16 *)(start);                                               \
        _Pragma("unroll")                                                           \
        for (int i_ = 0; i_ < (n); i_++)                                            \
            (sum) += w_[i_];                                                        \
    } while (0)

/* Rewrite the (already resized) frame into the reply, all but the ICMP quote: the caller
 * stores quote[0..rp->quote) behind the ICMP header (a helper call: the length varies).
 * quote is zero past rp->quote, so its whole buffer can be summed. 0 ok, -1 bad bounds. */
static __always_inline int nb_reject_write(void *data, void *data_end, struct nb_pkt *p,
                                           struct nb_reject_plan *rp, __u8 *quote)
{
    __u64 l3 = rp->l3_off;
    asm volatile("" : "+r"(l3));    /* bound it here, after the caller's helper calls */
    if (l3 > NB_L2_MAX)
        return -1;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return -1;
    __u8 mac[ETH_ALEN];
    __builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, mac, ETH_ALEN);

    __u32 iph = p->family == 4 ? NB_IP4_HDR : NB_IP6_HDR;
    void *l4 = data + l3 + iph;
    __u8 proto;
    __u32 l4_len;
    __u32 sum = 0;
    if (rp->tcp) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return -1;
        __builtin_memset(th, 0, sizeof(*th));
        th->source = bpf_htons(p->dport);
        th->dest = bpf_htons(p->sport);
        th->seq = rp->seq;
        th->ack_seq = rp->ack_seq;
        th->doff = 5;
        *((__u8 *)th + NB_TCP_FLAGS_OFF) = rp->rst_flags;
        proto = IPPROTO_TCP;
        l4_len = NB_TCP_HDR;
        NB_SUM_WORDS(th, NB_TCP_HDR / 2, sum);
    } else {
        struct icmphdr *ic = l4;
        if ((void *)(ic + 1) > data_end)
            return -1;
        __builtin_memset(ic, 0, sizeof(*ic));
        if (p->family == 4) {
            ic->type = 3;               /* destination unreachable */
            ic->code = 3;               /* port unreachable */
            proto = IPPROTO_ICMP;
        } else {
            ic->type = 1;               /* ICMPv6 destination unreachable */
            ic->code = 4;               /* port unreachable */
            proto = NB_IPPROTO_ICMPV6;
        }
        l4_len = NB_ICMP_HDR + rp->quote;
        NB_SUM_WORDS(ic, NB_ICMP_HDR / 2, sum);
        NB_SUM_WORDS(quote, NB_REJECT_QUOTE / 2, sum);
    }

    if (p->family == 4) {
        struct iphdr *ip = data + l3;
        if ((void *)(ip + 1) > data_end)
            return -1;
        __builtin_memset(ip, 0, sizeof(*ip));
        ip->version = 4;
        ip->ihl = 5;
        ip->tot_len = bpf_htons(NB_IP4_HDR + l4_len);
        ip->frag_off = bpf_htons(0x4000);   /* DF, as Linux sends its resets */
        ip->ttl = 64;
        ip->protocol = proto;
        __builtin_memcpy(&ip->saddr, p->dst, 4);
        __builtin_memcpy(&ip->daddr, p->src, 4);
        __u32 hsum = 0;
        NB_SUM_WORDS(ip, NB_IP4_HDR / 2, hsum);
        ip->check = ~nb_fold(hsum);
        if (proto == IPPROTO_TCP) {      /* pseudo header; ICMPv4 has none */
            NB_SUM_WORDS(p->src, 2, sum);
            NB_SUM_WORDS(p->dst, 2, sum);
            sum += bpf_htons(IPPROTO_TCP) + bpf_htons(l4_len);
        }
    } else {
        struct ipv6hdr *ip6 = data + l3;
        if ((void *)(ip6 + 1) > data_end)
            return -1;
        __builtin_memset(ip6, 0, sizeof(*ip6));
        ip6->version = 6;
        ip6->payload_len = bpf_htons(l4_len);
        ip6->nexthdr = proto;
        ip6->hop_limit = 64;
        __builtin_memcpy(&ip6->saddr, p->dst, 16);
        __builtin_memcpy(&ip6->daddr, p->src, 16);
        NB_SUM_WORDS(p->src, 8, sum);
        NB_SUM_WORDS(p->dst, 8, sum);
        sum += bpf_htons(proto) + bpf_htons(l4_len);
    }
    __u16 check = ~nb_fold(sum);
    if (rp->tcp) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return -1;
        th->check = check;
    } else {
        struct icmphdr *ic = l4;
        if ((void *)(ic + 1) > data_end)
            return -1;
        ic->checksum = check;
    }
    return 0;
}

#endif
