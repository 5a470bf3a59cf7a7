/* parse.h - bounded Ethernet/VLAN/IPv4/IPv6/L4 parsing into struct nb_pkt.
 * No maps, no policy: shared by the XDP and TC programs (both give data/data_end).
 * Every read is checked against data_end before it happens; see docs/dataplane.md
 * for the verdict each malformed class gets. */
#ifndef NETBPF_PARSE_H
#define NETBPF_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>

#define NB_PARSE_OK 0
#define NB_PARSE_NONIP 1        /* ARP, LLDP...: never classified, always passed */
#define NB_PARSE_MALFORMED 2    /* truncated or invalid L2/L3/L4 header: dropped */

#define NB_ETH_P_8021Q 0x8100
#define NB_ETH_P_8021AD 0x88A8
#define NB_IPPROTO_ICMPV6 58

struct nb_pkt {
    __u8 family;                /* 4 or 6 */
    __u8 proto;                 /* IPv4 protocol / IPv6 upper-layer next header */
    __u8 has_ports;             /* TCP or UDP header present (first fragment) */
    __u8 has_icmp;              /* ICMP (v4) or ICMPv6 (v6) header present */
    __u8 has_flags;             /* TCP header present */
    __u8 fragment;              /* non-first fragment: no L4 header at all */
    __u8 icmp_type;
    __u8 icmp_code;
    __u8 tcp_flags;
    __u8 has_icmp_id;           /* ICMP(v6) echo request/reply: icmp_id is set */
    __u8 pad[2];
    __u16 icmp_id;              /* echo identifier, host byte order */
    __u16 pad2;
    __u16 sport;                /* host byte order */
    __u16 dport;
    __u32 l3_off;
    __u32 l4_off;
    __u8 src[16];               /* IPv4 uses the first 4 bytes, network order */
    __u8 dst[16];
};

/* TCP flags byte: byte 13 of the TCP header (FIN 0x01 ... CWR 0x80). */
#define NB_TCP_FLAGS_OFF 13

static __always_inline int nb_parse_l4(void *data, void *data_end, struct nb_pkt *p, __u32 off)
{
    void *l4 = data + off;
    p->l4_off = off;
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return NB_PARSE_MALFORMED;
        p->sport = bpf_ntohs(th->source);
        p->dport = bpf_ntohs(th->dest);
        p->tcp_flags = *((__u8 *)th + NB_TCP_FLAGS_OFF);
        p->has_ports = 1;
        p->has_flags = 1;
    } else if (p->proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > data_end)
            return NB_PARSE_MALFORMED;
        p->sport = bpf_ntohs(uh->source);
        p->dport = bpf_ntohs(uh->dest);
        p->has_ports = 1;
    } else if ((p->family == 4 && p->proto == IPPROTO_ICMP) ||
               (p->family == 6 && p->proto == NB_IPPROTO_ICMPV6)) {
        __u8 *ih = l4;
        /* type, code and checksum: the fixed 4 bytes every ICMP message has */
        if ((void *)(ih + 4) > data_end)
            return NB_PARSE_MALFORMED;
        p->icmp_type = ih[0];
        p->icmp_code = ih[1];
        p->has_icmp = 1;
        /* echo request/reply (ICMP 8/0, ICMPv6 128/129) carry an identifier at bytes 4-5 */
        if ((p->icmp_type == 8 || p->icmp_type == 0 || p->icmp_type == 128 ||
             p->icmp_type == 129) && (void *)(ih + 8) <= data_end) {
            p->icmp_id = ((__u16)ih[4] << 8) | ih[5];
            p->has_icmp_id = 1;
        }
    }
    return NB_PARSE_OK;
}

static __always_inline int nb_parse_ipv4(void *data, void *data_end, struct nb_pkt *p, __u32 off)
{
    struct iphdr *iph = data + off;
    if ((void *)(iph + 1) > data_end)
        return NB_PARSE_MALFORMED;
    if (iph->version != 4 || iph->ihl < 5)
        return NB_PARSE_MALFORMED;
    __u32 hlen = iph->ihl * 4;
    if (bpf_ntohs(iph->tot_len) < hlen)
        return NB_PARSE_MALFORMED;
    if (data + off + hlen > data_end)
        return NB_PARSE_MALFORMED;
    p->family = 4;
    p->proto = iph->protocol;
    __builtin_memcpy(p->src, &iph->saddr, 4);
    __builtin_memcpy(p->dst, &iph->daddr, 4);
    /* fragment offset != 0: a non-first fragment, whose payload is not an L4 header */
    if (bpf_ntohs(iph->frag_off) & 0x1fff) {
        p->fragment = 1;
        return NB_PARSE_OK;
    }
    return nb_parse_l4(data, data_end, p, off + hlen);
}

static __always_inline int nb_parse_ipv6(void *data, void *data_end, struct nb_pkt *p, __u32 off)
{
    struct ipv6hdr *ip6 = data + off;
    if ((void *)(ip6 + 1) > data_end)
        return NB_PARSE_MALFORMED;
    if (ip6->version != 6)
        return NB_PARSE_MALFORMED;
    p->family = 6;
    __builtin_memcpy(p->src, &ip6->saddr, 16);
    __builtin_memcpy(p->dst, &ip6->daddr, 16);
    __u8 nexthdr = ip6->nexthdr;
    off += sizeof(*ip6);

#pragma unroll
    for (int i = 0; i < NB_MAX_EXTHDRS; i++) {
        __u8 *h = data + off;
        if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
            nexthdr == IPPROTO_DSTOPTS) {
            if ((void *)(h + 2) > data_end)
                return NB_PARSE_MALFORMED;
            nexthdr = h[0];
            off += ((__u32)h[1] + 1) * 8;
        } else if (nexthdr == IPPROTO_AH) {
            if ((void *)(h + 2) > data_end)
                return NB_PARSE_MALFORMED;
            nexthdr = h[0];
            off += ((__u32)h[1] + 2) * 4;
        } else if (nexthdr == IPPROTO_FRAGMENT) {
            if ((void *)(h + 8) > data_end)
                return NB_PARSE_MALFORMED;
            nexthdr = h[0];
            off += 8;
            /* offset field (13 bits, 8-byte units) non-zero: a non-first fragment */
            if (((((__u16)h[2]) << 8) | h[3]) & 0xfff8) {
                p->proto = nexthdr;
                p->fragment = 1;
                return NB_PARSE_OK;
            }
        } else {
            p->proto = nexthdr;
            return nb_parse_l4(data, data_end, p, off);
        }
    }
    /* more extension headers than we walk: treated as malformed rather than guessed at */
    return NB_PARSE_MALFORMED;
}

static __always_inline int nb_parse(void *data, void *data_end, struct nb_pkt *p)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return NB_PARSE_MALFORMED;
    __u16 h_proto = eth->h_proto;
    __u32 off = sizeof(*eth);

#pragma unroll
    for (int i = 0; i < NB_MAX_VLANS; i++) {
        if (h_proto != bpf_htons(NB_ETH_P_8021Q) && h_proto != bpf_htons(NB_ETH_P_8021AD))
            break;
        __u16 *vh = data + off;           /* TCI, then the encapsulated EtherType */
        if ((void *)(vh + 2) > data_end)
            return NB_PARSE_MALFORMED;
        h_proto = vh[1];
        off += 4;
    }
    p->l3_off = off;
    if (h_proto == bpf_htons(ETH_P_IP))
        return nb_parse_ipv4(data, data_end, p, off);
    if (h_proto == bpf_htons(ETH_P_IPV6))
        return nb_parse_ipv6(data, data_end, p, off);
    return NB_PARSE_NONIP;
}

#endif
