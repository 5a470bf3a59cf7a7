/* drop.bpf.c - the floor of the live drop rate: XDP_DROP everything, counting per CPU.
 * Not a filter: the cheapest drop XDP can do on this path, so the counter is the only work. */
#include <uapi/linux/bpf.h>

BPF_PERCPU_ARRAY(nb_bench_cnt, __u64, 1);

int nb_bench_drop(struct xdp_md *ctx)
{
    __u32 zero = 0;
    __u64 *c = nb_bench_cnt.lookup(&zero);
    if (c)
        *c += 1;
    return XDP_DROP;
}
