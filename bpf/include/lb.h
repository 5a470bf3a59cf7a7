/* lb.h - L4 load balancer: VIP lookup -> flow table or Maglev slot -> rewrite -> forward, and
 * the reverse translation of NAT replies on TC egress. Not the firewall (classify.h): the XDP
 * program balances only what the firewall allowed. Flow, NAT and counter maps are shared
 * through pins (-DNB_SHARED_PIN="dir") so the egress program and later reloads see them.
 * Two paths, both in the balancer's own program (nb_lb_entry, a tail call from the firewall):
 * an established flow (nb_lb_established) is one flow lookup, array reads, the rewrite and a
 * cached next hop; a new flow (nb_lb_balance) looks the VIP up and picks through Maglev.
 * Over 400 lines on purpose: both paths share the rewrite, next-hop and counter helpers, and
 * the TC reverse NAT shares the maps; split, each part would need the others. */
#ifndef NETBPF_LB_H
#define NETBPF_LB_H

#include "netbpf_abi.h"
#include "parse.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* NB_LB_REVERSE_ONLY (the TC program): only the NAT reverse path and the shared maps, so the
 * egress program does not hold its own copy of the rings and next hops (megabytes). */
#ifndef NB_LB_REVERSE_ONLY
BPF_HASH(nb_lb_vips, struct nb_vip_key, struct nb_vip, NB_LB_MAX_VIPS * 2);
BPF_ARRAY(nb_lb_ring, __u32, NB_LB_RING_CAP);
BPF_ARRAY(nb_lb_backends, struct nb_backend, NB_LB_MAX_BACKENDS);
BPF_ARRAY(nb_lb_vlive, struct nb_vip_live, NB_LB_MAX_VIPS);
BPF_ARRAY(nb_lb_ports, __u64, NB_LB_PORT_WORDS);
/* per CPU: each CPU refreshes its own copy, so no reader sees one half-written */
BPF_PERCPU_ARRAY(nb_lb_nh, struct nb_lb_nh, NB_LB_MAX_BACKENDS);
#endif
#ifdef NB_SHARED_PIN
BPF_TABLE_PINNED("lru_hash", struct nb_flow_key, struct nb_flow, nb_lb_flows, NB_LB_FLOWS,
                 NB_SHARED_PIN "/nb_lb_flows");
BPF_TABLE_PINNED("lru_hash", struct nb_nat_key, struct nb_nat_val, nb_lb_nat, NB_LB_FLOWS,
                 NB_SHARED_PIN "/nb_lb_nat");
BPF_TABLE_PINNED("percpu_array", __u32, struct nb_lb_counter, nb_lb_cnt,
                 NB_LB_MAX_VIPS + NB_LB_MAX_BACKENDS, NB_SHARED_PIN "/nb_lb_cnt");
#else
BPF_TABLE("lru_hash", struct nb_flow_key, struct nb_flow, nb_lb_flows, NB_LB_FLOWS);
BPF_TABLE("lru_hash", struct nb_nat_key, struct nb_nat_val, nb_lb_nat, NB_LB_FLOWS);
BPF_PERCPU_ARRAY(nb_lb_cnt, struct nb_lb_counter, NB_LB_MAX_VIPS + NB_LB_MAX_BACKENDS);
#endif

#ifndef NB_LB_REVERSE_ONLY
static __always_inline void nb_lb_count(__u32 idx, __u32 len, int fresh)
{
    struct nb_lb_counter *c = nb_lb_cnt.lookup(&idx);
    if (c) {
        c->packets += 1;
        c->bytes += len;
        c->conns += fresh;
    }
}

/* murmur3's finaliser per 32-bit word of the key: cheap, and every input bit moves the slot */
static __always_inline __u32 nb_mix32(__u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

static __always_inline __u32 nb_flow_hash(struct nb_flow_key *k)
{
    __u32 *w = (__u32 *)k;
    __u32 h = 0x9747b28c;
#pragma unroll
    for (int i = 0; i < sizeof(*k) / 4; i++)
        h = nb_mix32(h ^ w[i]);
    return h;
}

static __always_inline __u16 nb_csum_fold(__u64 csum)
{
#pragma unroll
    for (int i = 0; i < 4; i++)
        csum = (csum & 0xffff) + (csum >> 16);
    return (__u16)~csum;
}

/* RFC 1624 incremental update of *check for old -> new bytes (len a multiple of 4) */
static __always_inline __u16 nb_csum_update(__u16 check, void *old, void *new, __u32 len)
{
    __s64 d = bpf_csum_diff(old, len, new, len, ~((__u32)check) & 0xffff);
    return nb_csum_fold((__u64)d);
}

struct nb_dnat4 { __u32 addr; __u32 ports; };
struct nb_dnat6 { __u8 addr[16]; __u32 ports; };

/* Rewrite destination address and port to the backend's, with correct IP and L4 checksums. */
static __always_inline int nb_lb_dnat(struct xdp_md *ctx, struct nb_pkt *p, struct nb_backend *be)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 l3 = p->l3_off & 0x3f;
    __u32 l4 = p->l4_off & 0x3fff;      /* bounds for the verifier; parse.h set the real value */
    __u32 *pw = data + l4;
    if ((void *)(pw + 1) > data_end)
        return -1;
    __u16 *l4check = data + l4 + (p->proto == IPPROTO_TCP ? 16 : 6);
    if ((void *)(l4check + 1) > data_end)
        return -1;
    __u32 new_pw = *pw;
    ((__u16 *)&new_pw)[1] = bpf_htons(be->port);       /* keep sport, replace dport */

    if (p->family == 4) {
        struct iphdr *iph = data + l3;
        if ((void *)(iph + 1) > data_end)
            return -1;
        struct nb_dnat4 o = {.addr = iph->daddr, .ports = *pw}, n = {.ports = new_pw};
        __builtin_memcpy(&n.addr, be->addr, 4);
        iph->check = nb_csum_update(iph->check, &o.addr, &n.addr, 4);
        /* UDP over IPv4 may carry no checksum (0): leave it so */
        if (!(p->proto == IPPROTO_UDP && *l4check == 0)) {
            __u16 c = nb_csum_update(*l4check, &o, &n, sizeof(o));
            *l4check = (p->proto == IPPROTO_UDP && c == 0) ? 0xffff : c;
        }
        iph->daddr = n.addr;
    } else {
        struct ipv6hdr *ip6 = data + l3;
        if ((void *)(ip6 + 1) > data_end)
            return -1;
        struct nb_dnat6 o = {.ports = *pw}, n = {.ports = new_pw};
        __builtin_memcpy(o.addr, &ip6->daddr, 16);
        __builtin_memcpy(n.addr, be->addr, 16);
        __u16 c = nb_csum_update(*l4check, &o, &n, sizeof(o));
        *l4check = (p->proto == IPPROTO_UDP && c == 0) ? 0xffff : c;
        __builtin_memcpy(&ip6->daddr, be->addr, 16);
    }
    *pw = new_pw;
    return 0;
}

/* The FIB's answer for dst, as a cached next hop: XDP_TX when the route leaves by the
 * interface the packet came in on; DSR redirects to another interface; NAT otherwise lets the
 * kernel forward the rewritten packet (a redirect needs an XDP-capable receiver on veths and
 * bridges, which netbpf cannot promise). Returns the NB_LB_NH_* kind written to nh, 0 for
 * "the kernel forwards this one" without an answer to keep, or -1 for "drop". */
static __always_inline int nb_lb_route(struct xdp_md *ctx, struct nb_pkt *p, __u8 *dst,
                                       __u16 dport, __u32 len, int dsr, struct nb_lb_nh *nh)
{
    struct bpf_fib_lookup fib = {};
    fib.ifindex = ctx->ingress_ifindex;
    fib.l4_protocol = p->proto;
    fib.sport = bpf_htons(p->sport);
    fib.dport = bpf_htons(dport);
    fib.tot_len = len - p->l3_off;
    if (p->family == 4) {
        fib.family = AF_INET;
        __builtin_memcpy(&fib.ipv4_src, p->src, 4);
        __builtin_memcpy(&fib.ipv4_dst, dst, 4);
    } else {
        fib.family = AF_INET6;
        __builtin_memcpy(fib.ipv6_src, p->src, 16);
        __builtin_memcpy(fib.ipv6_dst, dst, 16);
    }
    /* OUTPUT: look up as the sender we now are, not as a router checking the client's
     * address; the kernel still answers only if this interface forwards (checked: with
     * forwarding off every lookup fails, so DSR drops and NAT leaves it to the stack) */
    long rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
    __u32 kind;
    if (rc == BPF_FIB_LKUP_RET_SUCCESS && fib.ifindex == ctx->ingress_ifindex)
        kind = NB_LB_NH_TX;
    else if (rc == BPF_FIB_LKUP_RET_SUCCESS && dsr)
        kind = NB_LB_NH_REDIRECT;
    else if (dsr)
        return -1;                 /* DSR without a route or neighbour entry, or too big */
    else if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
        return 0;                  /* NAT, too big: the kernel answers; the route stays good */
    else
        kind = NB_LB_NH_STACK;     /* the kernel routes it, resolving a missing neighbour */
    nh->kind = kind;
    nh->dsr = dsr;
    nh->in_ifindex = ctx->ingress_ifindex;
    nh->out_ifindex = fib.ifindex;
    /* mtu_result shares tot_len's place: on success the route's MTU */
    nh->mtu = rc == BPF_FIB_LKUP_RET_SUCCESS ? fib.mtu_result : 0xffff;
    __builtin_memcpy(nh->smac, fib.smac, ETH_ALEN);
    __builtin_memcpy(nh->dmac, fib.dmac, ETH_ALEN);
    return kind;
}

static __always_inline int nb_lb_same16(__u8 *a, __u8 *b)
{
    __u64 a0, a1, b0, b1;
    __builtin_memcpy(&a0, a, 8);
    __builtin_memcpy(&a1, a + 8, 8);
    __builtin_memcpy(&b0, b, 8);
    __builtin_memcpy(&b1, b + 8, 8);
    return a0 == b0 && a1 == b1;
}

/* Send toward dst through the backend's next hop, looked up in the FIB at most once a second
 * per CPU (Katran does no lookup at all): a route or neighbour change is followed within 1 s.
 * The cache is per backend, so routing by the client's address or ports is not followed. */
static __always_inline int nb_lb_forward(struct xdp_md *ctx, struct nb_pkt *p, __u32 bid,
                                         __u8 *dst, __u16 dport, __u32 len, int dsr, __u64 now)
{
    __u32 k = bid;
    struct nb_lb_nh *nh = nb_lb_nh.lookup(&k);
    if (!nh)
        return XDP_DROP;
    if (now - nh->stamp_ns > NB_LB_NH_TTL_NS || nh->in_ifindex != ctx->ingress_ifindex ||
        nh->dsr != dsr || len - p->l3_off > nh->mtu || !nb_lb_same16(nh->dst, dst)) {
        nh->stamp_ns = 0;          /* half-made below: not used again until complete */
        int kind = nb_lb_route(ctx, p, dst, dport, len, dsr, nh);
        if (kind < 0) {
            nb_stat(NB_STAT_LB_DROP, len);
            return XDP_DROP;
        }
        if (kind == 0) {
            nb_stat(NB_STAT_LB_STACK, len);
            return XDP_PASS;
        }
        __builtin_memcpy(nh->dst, dst, 16);
        nh->stamp_ns = now;
    }
    __u32 kind = nh->kind, out = nh->out_ifindex;
    if (kind == NB_LB_NH_STACK) {
        nb_stat(NB_STAT_LB_STACK, len);
        return XDP_PASS;
    }
    __u8 macs[2 * ETH_ALEN];
    __builtin_memcpy(macs, nh->dmac, ETH_ALEN);
    __builtin_memcpy(macs + ETH_ALEN, nh->smac, ETH_ALEN);
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    if (data + sizeof(macs) > data_end)
        return XDP_DROP;
    __builtin_memcpy(data, macs, sizeof(macs));     /* h_dest, then h_source */
    if (kind == NB_LB_NH_TX) {
        nb_stat(NB_STAT_LB_TX, len);
        return XDP_TX;
    }
    nb_stat(NB_STAT_LB_REDIRECT, len);
    return bpf_redirect(out, 0);
}

static __always_inline struct nb_vip *nb_lb_vip_of(struct nb_pkt *p)
{
    if (!p->has_ports)
        return 0;
    struct nb_vip_key vk = {.family = p->family, .proto = p->proto, .port = p->dport};
    __builtin_memcpy(vk.addr, p->dst, 16);
    return nb_lb_vips.lookup(&vk);
}

#define NB_LB_TCP_SYN 0x02
#define NB_LB_TCP_ACK 0x10

/* A TCP SYN without ACK opens a connection: it always picks through Maglev, as Katran does,
 * so a client reusing a 5-tuple never follows an old entry to a drained or removed backend. */
static __always_inline int nb_lb_opens(struct nb_pkt *p)
{
    return p->proto == IPPROTO_TCP &&
           (p->tcp_flags & (NB_LB_TCP_SYN | NB_LB_TCP_ACK)) == NB_LB_TCP_SYN;
}

/* Some VIP listens on this destination port: one array read keeps the flow lookup off
 * every other packet. */
static __always_inline int nb_lb_port_used(struct nb_pkt *p)
{
    if (!p->has_ports)
        return 0;
    __u32 w = p->dport >> 6;
    __u64 *bits = nb_lb_ports.lookup(&w);
    return bits && (*bits >> (p->dport & 63)) & 1;
}

static __always_inline void nb_lb_flow_key(struct nb_pkt *p, struct nb_flow_key *fk)
{
    fk->family = p->family;
    fk->proto = p->proto;
    fk->sport = p->sport;
    fk->dport = p->dport;
    fk->pad = 0;
    __builtin_memcpy(fk->saddr, p->src, 16);
    __builtin_memcpy(fk->daddr, p->dst, 16);
}

/* Counters, NAT reverse entry for a new flow, rewrite, forward: the end of both paths. */
static __always_inline int nb_lb_send(struct xdp_md *ctx, struct nb_pkt *p, __u32 vip_index,
                                      __u32 mode, __u32 bid, struct nb_backend *be, __u32 len,
                                      int fresh, __u64 now)
{
    nb_lb_count(vip_index, len, fresh);
    nb_lb_count(NB_LB_MAX_VIPS + (bid & (NB_LB_MAX_BACKENDS - 1)), len, fresh);
    struct nb_backend b = *be;          /* the map value may not be read after packet writes */
    if (mode == NB_LB_DSR)
        return nb_lb_forward(ctx, p, bid, b.addr, p->dport, len, 1, now);
    if (fresh) {
        struct nb_nat_key nk = {.family = p->family, .proto = p->proto, .bport = b.port,
                                .cport = p->sport};
        __builtin_memcpy(nk.baddr, b.addr, 16);
        __builtin_memcpy(nk.caddr, p->src, 16);
        struct nb_nat_val nv = {.vport = p->dport};
        __builtin_memcpy(nv.vaddr, p->dst, 16);
        nb_lb_nat.update(&nk, &nv);
    }
    if (nb_lb_dnat(ctx, p, &b) < 0)
        return XDP_DROP;
    return nb_lb_forward(ctx, p, bid, b.addr, b.port, len, 0, now);
}

/* An established flow: its entry, the VIP it was made for still the same (one array read,
 * no VIP hash lookup), not idle past the VIP's timeout, its backend still in the policy
 * (draining backends keep their flows). Returns -1 when the packet must be balanced anew:
 * no entry, a changed or removed VIP, an expired flow, a removed backend. A TCP SYN never
 * comes here: it always picks through Maglev, as Katran does, so a client reusing a 5-tuple
 * never follows an old entry to a drained or removed backend. */
static __always_inline int nb_lb_established(struct xdp_md *ctx, struct nb_pkt *p, __u32 len)
{
    struct nb_flow_key fk;
    nb_lb_flow_key(p, &fk);
    struct nb_flow *fl = nb_lb_flows.lookup(&fk);
    if (!fl)
        return -1;
    __u32 vi = fl->vip_index;
    struct nb_vip_live *vl = nb_lb_vlive.lookup(&vi);
    if (!vl || vl->sig != fl->vip_sig || vl->sig == 0)
        return -1;
    /* CLOCK_MONOTONIC at tick resolution: ample for second-scale timeouts, and measured
     * 20 ns a packet cheaper than bpf_ktime_get_ns() on our VMs (bench/README.md) */
    __u64 now = bpf_ktime_get_coarse_ns();
    __u64 age = now - fl->last_ns;      /* unsigned: a last_ns from the future is expired */
    if (age > vl->idle_ns)
        return -1;
    __u32 bid = fl->backend;
    struct nb_backend *be = nb_lb_backends.lookup(&bid);
    if (!be || !(be->flags & NB_BE_ACTIVE))
        return -1;                      /* removed from the policy: balanced again */
    if (age > vl->touch_ns)
        fl->last_ns = now;              /* coarse: one write per touch_ns, not one per packet */
    return nb_lb_send(ctx, p, vi, fl->mode, bid, be, len, 0, now);
}

/* A new flow to vip: pick through Maglev, remember the choice. */
static __always_inline int nb_lb_balance(struct xdp_md *ctx, struct nb_pkt *p,
                                         struct nb_vip *vip, __u32 len)
{
    if (vip->ring_size == 0)
        return XDP_DROP;
    struct nb_flow_key fk;
    nb_lb_flow_key(p, &fk);
    __u32 slot = vip->ring_off + nb_flow_hash(&fk) % vip->ring_size;
    __u32 *b = nb_lb_ring.lookup(&slot);
    if (!b || *b == NB_LB_NO_BACKEND) {
        nb_lb_count(vip->index, len, 0);
        nb_stat(NB_STAT_LB_DROP, len);
        return XDP_DROP;
    }
    __u32 bid = *b;
    struct nb_backend *be = nb_lb_backends.lookup(&bid);
    if (!be)
        return XDP_DROP;
    __u64 now = bpf_ktime_get_coarse_ns();
    /* overwrites any old entry of this 5-tuple (a reused port, an expired flow) */
    struct nb_flow nf = {.backend = bid, .vip_index = vip->index, .last_ns = now,
                         .vip_sig = vip->sig, .mode = vip->mode};
    nb_lb_flows.update(&fk, &nf);
    return nb_lb_send(ctx, p, vip->index, vip->mode, bid, be, len, 1, now);
}

/* A packet the firewall allowed to a VIP port: its established flow, else, for a VIP, a new
 * flow; anything else passes untouched. */
static __always_inline int nb_lb_packet(struct xdp_md *ctx, struct nb_pkt *p, __u32 len)
{
    if (!nb_lb_opens(p)) {
        int v = nb_lb_established(ctx, p, len);
        if (v >= 0)
            return v;
    }
    struct nb_vip *vip = nb_lb_vip_of(p);
    if (!vip)
        return XDP_PASS;
    struct nb_vip v = *vip;     /* one VIP value for the whole packet */
    return nb_lb_balance(ctx, p, &v, len);
}

#endif /* NB_LB_REVERSE_ONLY */

/* TC egress of the VIP's interface: a backend's reply leaves as VIP:port again. */
static __always_inline void nb_lb_reverse(struct __sk_buff *skb, struct nb_pkt *p)
{
    if (!p->has_ports)
        return;
    struct nb_nat_key k = {.family = p->family, .proto = p->proto, .bport = p->sport,
                           .cport = p->dport};
    __builtin_memcpy(k.baddr, p->src, 16);
    __builtin_memcpy(k.caddr, p->dst, 16);
    struct nb_nat_val *v = nb_lb_nat.lookup(&k);
    if (!v)
        return;
    struct nb_nat_val nv = *v;
    __u32 l3 = p->l3_off, l4 = p->l4_off;
    __u32 csum_off = l4 + (p->proto == IPPROTO_TCP ? 16 : 6);
    __u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
    __u16 old_port = bpf_htons(p->sport), new_port = bpf_htons(nv.vport);
    if (p->family == 4) {
        __u32 old_a, new_a;
        __builtin_memcpy(&old_a, p->src, 4);
        __builtin_memcpy(&new_a, nv.vaddr, 4);
        bpf_l4_csum_replace(skb, csum_off, old_a, new_a, BPF_F_PSEUDO_HDR | mangled | 4);
        bpf_l3_csum_replace(skb, l3 + 10, old_a, new_a, 4);
        bpf_skb_store_bytes(skb, l3 + 12, &new_a, 4, 0);
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __u32 old_w, new_w;
            __builtin_memcpy(&old_w, p->src + 4 * i, 4);
            __builtin_memcpy(&new_w, nv.vaddr + 4 * i, 4);
            bpf_l4_csum_replace(skb, csum_off, old_w, new_w, BPF_F_PSEUDO_HDR | mangled | 4);
        }
        bpf_skb_store_bytes(skb, l3 + 8, nv.vaddr, 16, 0);
    }
    bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | 2);
    bpf_skb_store_bytes(skb, l4, &new_port, 2, 0);
}

#endif
