/* parse_only.bpf.c - netbpf's header parsing (parse.h) and nothing else: no maps, no
 * classification. The gap to empty.bpf.c is parsing; the gap to the firewall is classifying. */
#include <uapi/linux/bpf.h>
#include "netbpf_abi.h"
#include "parse.h"

int nb_bench_parse(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct nb_pkt p = {};

    int rc = nb_parse(data, data_end, &p);
    /* use the result, or clang would drop the parse as dead code */
    if (rc == NB_PARSE_MALFORMED || p.dport == 0xffff)
        return XDP_DROP;
    return XDP_PASS;
}
