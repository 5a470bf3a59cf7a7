/* firewall.h - what both firewall programs (bpf/xdp, bpf/tc) are built on: the contract, the
 * parser, the classifier, reject replies, conntrack and the balancer when built with them
 * (NB_CONNTRACK, NB_LB), and the handoff to the reject replies' own program.
 * No entry points: each program file holds only what its hook does differently. */
#ifndef NETBPF_FIREWALL_H
#define NETBPF_FIREWALL_H

#include <uapi/linux/bpf.h>
#include "netbpf_abi.h"
#include "parse.h"
#include "classify.h"
#include "reject.h"
#ifdef NB_CONNTRACK
#include "conntrack.h"
#endif
#ifdef NB_LB
#include "lb.h"
#endif

/* Reject replies are built by their own program, reached by a tail call, so the verifier
 * checks the packet rewriting once, not once per path through the classifier. The refused
 * packet is handed over in a per-CPU scratch (same CPU, no preemption in between). */
struct nb_rej_handoff {
    struct nb_pkt p;
    __u32 egress;                   /* TC: the refused packet was being sent */
    __u32 pad;
};
BPF_PROG_ARRAY(nb_rej_jump, 1);     /* [0] = nb_rej_xdp or nb_rej_tc, set by the controller */
BPF_PERCPU_ARRAY(nb_rej_scratch, struct nb_rej_handoff, 1);

/* Hand p to the reply builder. Does not return once the builder is linked; until then it
 * falls through and the caller drops. */
static __always_inline void nb_rej_handoff(void *ctx, struct nb_pkt *p, __u32 egress)
{
    __u32 zero = 0;
    struct nb_rej_handoff *h = nb_rej_scratch.lookup(&zero);
    if (h) {
        h->p = *p;
        h->egress = egress;
        nb_rej_jump.call(ctx, 0);
    }
}

/* What a reply builder works on, in either hook: the refused packet, the plan of its reply,
 * the bytes an ICMP error quotes. */
struct nb_rej_job {
    struct nb_pkt p;
    struct nb_reject_plan rp;
    __u8 quote[NB_REJECT_QUOTE];
    __u32 egress;
};

/* The reply builder's first step: the handed-over packet and the plan of its reply. Returns
 * the length of the ICMP quote with a bound the verifier believes (meaningless for a TCP
 * RST), or -1 when no reply can be built (drop). */
static __always_inline int nb_rej_begin(void *data, void *data_end, struct nb_rej_job *j)
{
    __u32 zero = 0;
    struct nb_rej_handoff *h = nb_rej_scratch.lookup(&zero);
    if (!h)
        return -1;
    j->p = h->p;
    j->egress = h->egress;
    if (nb_reject_plan(data, data_end, &j->p, &j->rp) < 0)
        return -1;
    __u64 q = j->rp.quote;
    asm volatile("" : "+r"(q));     /* keep the mask below: the verifier needs the bound */
    return q & (2 * NB_REJECT_QUOTE - 1);
}

#endif
