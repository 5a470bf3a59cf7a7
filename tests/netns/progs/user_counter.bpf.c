/* user_counter.bpf.c - stands in for a user's own clsact filter (not netbpf's): counts every
 * packet in user_cnt and returns TC_ACT_UNSPEC so the next filter (netbpf's) still runs.
 * Built with clang -target bpf and attached with plain `tc filter add ... bpf da obj`. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u64);
} user_cnt SEC(".maps");

SEC("tc")
int user_count(struct __sk_buff *skb)
{
    __u32 k = 0;
    __u64 *v = bpf_map_lookup_elem(&user_cnt, &k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return -1;
}

char LICENSE[] SEC("license") = "GPL";
