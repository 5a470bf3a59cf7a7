/* empty.bpf.c - the floor of every per-packet figure: an XDP program that only returns.
 * Not a filter: whatever a program costs beyond this is its own work. */
#include <uapi/linux/bpf.h>

int nb_bench_empty(struct xdp_md *ctx)
{
    return XDP_PASS;
}
