/* firewall.bpf.c (tc) - clsact firewall: parse -> classify -> act -> count, plus conntrack.
 * nb_fw_tc_eg runs on egress (records connections when built with NB_CONNTRACK);
 * nb_fw_tc_in runs on ingress where XDP is not wanted (passes tracked replies first).
 * Built with NB_LB, egress also turns load-balanced NAT replies back into VIP:port.
 * Same classifier and map layout as the XDP program; each load has its own rule maps. */
#include <uapi/linux/pkt_cls.h>
#include "firewall.h"

/* No verdict of ours (allowed, counted, not IP): TC_ACT_UNSPEC, which TCX names TCX_NEXT and
 * cls_bpf's direct-action reads as "run the next filter". Other programs on the hook still see
 * the packet and the last one decides (none left: it passes). Only a drop ends the chain. */
#define NB_TC_NEXT TC_ACT_UNSPEC

/* Headers must be in the linear part for direct access; pulling is a no-op when they are. */
#define NB_PULL_LEN 256

/* The reject replies' builder (firewall.h), TC side: a refused packet we were sending goes
 * back up our own stack (ingress of the same device); a refused received one goes back out. */
int nb_rej_tc(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct nb_rej_job j = {};
    int q = nb_rej_begin(data, data_end, &j);
    if (q < 0)
        return TC_ACT_SHOT;
    __u32 l3 = j.rp.l3_off;
    if (!j.rp.tcp && (q < 4 || q > NB_REJECT_QUOTE || bpf_skb_load_bytes(skb, l3, j.quote, q)))
        return TC_ACT_SHOT;
    if (bpf_skb_change_tail(skb, j.rp.new_len, 0) || bpf_skb_pull_data(skb, j.rp.new_len))
        return TC_ACT_SHOT;
    data = (void *)(long)skb->data;
    data_end = (void *)(long)skb->data_end;
    if (nb_reject_write(data, data_end, &j.p, &j.rp, j.quote) < 0)
        return TC_ACT_SHOT;
    __u32 iph = j.p.family == 4 ? NB_IP4_HDR : NB_IP6_HDR;
    if (!j.rp.tcp && (q < 4 || q > NB_REJECT_QUOTE ||
                      bpf_skb_store_bytes(skb, l3 + iph + NB_ICMP_HDR, j.quote, q, 0)))
        return TC_ACT_SHOT;
    /* the checksums are whole now: nothing downstream may trust or finish an old one */
    bpf_csum_level(skb, BPF_CSUM_LEVEL_RESET);
    nb_stat(NB_STAT_REJECT, j.rp.new_len);
    return bpf_redirect(skb->ifindex, j.egress ? BPF_F_INGRESS : 0);
}

static __always_inline int nb_fw_tc(struct __sk_buff *skb, int egress)
{
    __u32 len = skb->len;
    bpf_skb_pull_data(skb, len < NB_PULL_LEN ? len : NB_PULL_LEN);
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct nb_pkt p = {};

    int rc = nb_parse(data, data_end, &p);
    if (rc == NB_PARSE_NONIP) {
        nb_stat(NB_STAT_NONIP, len);
        nb_stat(NB_STAT_PASS, len);
        return NB_TC_NEXT;
    }
    if (rc != NB_PARSE_OK) {
        nb_stat(NB_STAT_MALFORMED, len);
        /* our own stack wrote it: pass on egress rather than break the host; drop on ingress */
        nb_stat(egress ? NB_STAT_PASS : NB_STAT_DROP, len);
        return egress ? NB_TC_NEXT : TC_ACT_SHOT;
    }
#ifdef NB_CONNTRACK
    if (!egress && nb_ct_ingress(&p)) {
        nb_stat(NB_STAT_CT_REPLY, len);
        nb_stat(NB_STAT_PASS, len);
        return NB_TC_NEXT;
    }
#endif
    struct nb_pending pend;
    int act = nb_classify(&p, len, &pend);
    if (act != NB_ACT_ALLOW) {
        nb_count_rules(&pend, len);
        if (act == NB_ACT_REJECT)
            nb_rej_handoff(skb, &p, egress);    /* does not return; falls through (drop) */
        return TC_ACT_SHOT;
    }
#ifdef NB_CONNTRACK
    if (egress)
        nb_ct_egress(&p);
#endif
#ifdef NB_LB
    if (egress)
        nb_lb_reverse(skb, &p);
#endif
    nb_count_rules(&pend, len);
    return NB_TC_NEXT;
}

int nb_fw_tc_eg(struct __sk_buff *skb)
{
    return nb_fw_tc(skb, 1);
}

int nb_fw_tc_in(struct __sk_buff *skb)
{
    return nb_fw_tc(skb, 0);
}
