/* tiny_tc.bpf.c - a tiny clsact (SCHED_CLS, direct-action) program for the kernel-layer tests.
 * First byte 0xff: TC_ACT_SHOT; otherwise mark the packet by writing 0xaa into the last
 * byte of the source MAC and return TC_ACT_OK. Not product code. */

#include <linux/pkt_cls.h>

BPF_PERCPU_ARRAY(nbt_tc_hits, u64, 2);      /* 0: ok, 1: shot */

int nbt_tc(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    unsigned char *p = data;

    if (data + 14 > data_end)
        return TC_ACT_OK;
    if (p[0] == 0xff) {
        nbt_tc_hits.increment(1);
        return TC_ACT_SHOT;
    }
    p[11] = 0xaa;
    nbt_tc_hits.increment(0);
    return TC_ACT_OK;
}
