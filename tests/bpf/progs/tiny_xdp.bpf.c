/* tiny_xdp.bpf.c - a tiny XDP program for the kernel-layer tests (tests/bpf), not product code.
 * The first byte picks the verdict (0xff drop, 0xfe swap MACs and XDP_TX, else NBT_DEFAULT);
 * its maps exist to exercise netbpf.kernel.bpfsys (one of each type the product uses). */

#ifndef NBT_DEFAULT
#define NBT_DEFAULT XDP_PASS
#endif

struct nbt_lpm4 {
    u32 prefixlen;
    u32 addr;               /* network byte order, like a packet's */
};

BPF_PERCPU_ARRAY(nbt_verdicts, u64, 8);     /* packets per XDP verdict, per CPU */
BPF_ARRAY(nbt_array, u64, 16);
BPF_HASH(nbt_hash, u32, u64, 1024);
BPF_PERCPU_HASH(nbt_pcpu_hash, u32, u64, 64);
BPF_TABLE("lru_hash", u32, u64, nbt_lru, 64);
BPF_LPM_TRIE(nbt_lpm, struct nbt_lpm4, u32, 128);

int nbt_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    unsigned char *p = data;
    unsigned char tmp[6];
    u32 verdict = NBT_DEFAULT;

    if (data + 14 > data_end)
        verdict = XDP_ABORTED;
    else if (p[0] == 0xff)
        verdict = XDP_DROP;
    else if (p[0] == 0xfe) {
        __builtin_memcpy(tmp, p, 6);
        __builtin_memcpy(p, p + 6, 6);
        __builtin_memcpy(p + 6, tmp, 6);
        verdict = XDP_TX;
    }
    nbt_verdicts.increment(verdict);
    return verdict;
}
