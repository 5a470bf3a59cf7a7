/* firewall.bpf.c - XDP ingress: parse -> conntrack -> classify -> act -> count -> balance.
 * Tables come from the controller (netbpf/compile.py via netbpf/apply.py); this program never
 * changes when rules change. Non-IP frames pass; malformed frames drop (docs/dataplane.md).
 * Built with NB_LB, packets the firewall allows to a VIP go to the load balancer (lb.h). */
#include <uapi/linux/bpf.h>
#include "netbpf_abi.h"
#include "parse.h"
#include "classify.h"
#ifdef NB_CONNTRACK
#include "conntrack.h"
#endif
#ifdef NB_LB
#include "lb.h"
#endif

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
    if (nb_classify(&p, len) == NB_ACT_DROP)
        return XDP_DROP;
#ifdef NB_LB
    int lb = nb_lb_xdp(ctx, &p, len);
    if (lb >= 0)
        return lb;
#endif
    return XDP_PASS;
}
