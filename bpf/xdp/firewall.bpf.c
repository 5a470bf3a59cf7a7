/* firewall.bpf.c - XDP ingress: parse -> conntrack -> classify -> act -> count -> balance.
 * Tables come from the controller (netbpf/compile.py via netbpf/apply.py); this program never
 * changes when rules change. Non-IP frames pass; malformed frames drop (docs/dataplane.md).
 * Built with NB_LB, packets the firewall allows to a VIP go to the load balancer (lb.h) by a
 * tail call: the balancer is verified as its own program, not once per path of the classifier. */
#include "firewall.h"

#ifdef NB_LB
BPF_PROG_ARRAY(nb_lb_jump, 1);     /* [0] = nb_lb_entry, set by the controller after load */

/* What the firewall already knows, handed to the balancer across the tail call (same CPU,
 * no preemption in between), so it neither parses again nor looks the VIP up again. */
struct nb_lb_handoff {
    struct nb_pkt p;
    struct nb_vip vip;
    __u32 len;
    __u32 pad;
};
BPF_PERCPU_ARRAY(nb_lb_scratch, struct nb_lb_handoff, 1);

int nb_lb_entry(struct xdp_md *ctx)
{
    __u32 zero = 0;
    struct nb_lb_handoff *h = nb_lb_scratch.lookup(&zero);
    if (!h)
        return XDP_PASS;
    /* read in place: the scratch is this CPU's and nothing else runs here until we return */
    int lb = nb_lb_balance(ctx, &h->p, &h->vip, h->len);
    return lb >= 0 ? lb : XDP_PASS;
}
#endif

/* The reject replies' builder (firewall.h), XDP side: the reply goes back out (XDP_TX). */
int nb_rej_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct nb_rej_job j = {};
    int q = nb_rej_begin(data, data_end, &j);
    if (q < 0)
        return XDP_DROP;
    __u32 l3 = j.rp.l3_off;
    if (!j.rp.tcp && (q < 4 || q > NB_REJECT_QUOTE || nb_xdp_load_bytes(ctx, l3, j.quote, q)))
        return XDP_DROP;
    __u32 iph = j.p.family == 4 ? NB_IP4_HDR : NB_IP6_HDR;
    if (!j.rp.tcp) {
        /* Room for the new IP and ICMP headers goes in front (XDP guarantees headroom, not
         * tailroom): the refused packet then already sits where the ICMP quote belongs, and
         * only its L2 header moves to the new front. */
        __u8 l2[NB_L2_MAX] = {};
        __u32 n = l3 & 31;
        if (n < 14 || n > NB_L2_MAX || nb_xdp_load_bytes(ctx, 0, l2, n))
            return XDP_DROP;
        if (bpf_xdp_adjust_head(ctx, -(int)(iph + NB_ICMP_HDR)))
            return XDP_DROP;
        if (nb_xdp_store_bytes(ctx, 0, l2, n))
            return XDP_DROP;
    }
    __u64 new_len = j.rp.new_len;
    asm volatile("" : "+r"(new_len));   /* bounded: clang may add it to a packet pointer */
    new_len &= 0x1ff;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    if (bpf_xdp_adjust_tail(ctx, (int)new_len - (int)(data_end - data)))
        return XDP_DROP;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    if (nb_reject_write(data, data_end, &j.p, &j.rp, j.quote) < 0)
        return XDP_DROP;
    nb_stat(NB_STAT_REJECT, j.rp.new_len);
    return XDP_TX;
}

int nb_fw_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 len = data_end - data;
    struct nb_pkt p = {};

    int rc = nb_parse(data, data_end, &p);
    if (rc == NB_PARSE_NONIP) {
        nb_stat(NB_STAT_NONIP, len);
        nb_stat(NB_STAT_PASS, len);
        return XDP_PASS;
    }
    if (rc != NB_PARSE_OK) {
        nb_stat(NB_STAT_MALFORMED, len);
        nb_stat(NB_STAT_DROP, len);
        return XDP_DROP;
    }
#ifdef NB_CONNTRACK
    if (nb_ct_ingress(&p)) {
        nb_stat(NB_STAT_CT_REPLY, len);
        nb_stat(NB_STAT_PASS, len);
        return XDP_PASS;
    }
#endif
    struct nb_pending pend;
    int act = nb_classify(&p, len, &pend);
    nb_count_rules(&pend, len);
    if (act == NB_ACT_DROP)
        return XDP_DROP;
    if (act == NB_ACT_REJECT) {
        nb_rej_handoff(ctx, &p, 0);     /* does not return; falls through (drop) if unset */
        return XDP_DROP;
    }
#ifdef NB_LB
    struct nb_vip *vip = nb_lb_vip_of(&p);
    if (vip) {
        __u32 zero = 0;
        struct nb_lb_handoff *h = nb_lb_scratch.lookup(&zero);
        if (h) {
            h->p = p;
            h->vip = *vip;
            h->len = len;
            nb_lb_jump.call(ctx, 0);    /* does not return; falls through only if unset */
        }
    }
#endif
    return XDP_PASS;
}
