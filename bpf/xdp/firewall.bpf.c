/* firewall.bpf.c - XDP ingress: parse -> conntrack -> classify -> act -> count -> balance.
 * Tables come from the controller (netbpf/compile.py via netbpf/apply.py); this program never
 * changes when rules change. Non-IP frames pass; malformed frames drop (docs/dataplane.md).
 * Built with NB_LB, packets the firewall allows to a VIP port go to the load balancer (lb.h)
 * by a tail call: the balancer is verified as its own program, not once per classifier path. */
#include "firewall.h"

#ifdef NB_LB
BPF_PROG_ARRAY(nb_lb_jump, 1);     /* [0] = nb_lb_entry, set by the controller after load */

/* The balancer, reached by a tail call once the firewall allowed a packet to a VIP port: its
 * own program, so the verifier checks it once, not once per path through the classifier
 * (inline, it took the program past the verifier's 1M instructions at 256 words). It parses
 * the frame again (a few ns: cheaper than handing the parsed packet over through a map). */
int nb_lb_entry(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct nb_pkt p = {};
    if (nb_parse(data, data_end, &p) != NB_PARSE_OK)
        return XDP_PASS;
    return nb_lb_packet(ctx, &p, data_end - data);
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
    if (nb_lb_port_used(&p))
        nb_lb_jump.call(ctx, 0);        /* does not return; falls through only if unset */
#endif
    return XDP_PASS;
}
