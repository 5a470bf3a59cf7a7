/* netbpf_abi.h - the contract between the BPF programs and the controller.
 * Map and program names, key/value layouts, action and field codes, limits. No code.
 * netbpf/abi.py mirrors this file once, spelling every constant the same;
 * tests/unit/test_abi_contract.py checks they agree (host compiler, no root) and
 * tests/bpf/test_abi.py checks the maps a real load creates. */
#ifndef NETBPF_ABI_H
#define NETBPF_ABI_H

/* ---- kernel object names: at most 15 characters (BPF_OBJ_NAME_LEN), as bpftool and the pins
 * show them. The declarations spell them out (bcc names a map after its identifier); the
 * contract test checks that every map and program declared under bpf/ is listed here. ---- */
#define NB_MAP_FW_GEN "nb_fw_gen"
#define NB_MAP_FW_CFG "nb_fw_cfg"
#define NB_MAP_FW_RULES "nb_fw_rules"
#define NB_MAP_FW_CRULES "nb_fw_crules"
#define NB_MAP_FW_VECS "nb_fw_vecs"
#define NB_MAP_FW_DIR "nb_fw_dir"
#define NB_MAP_FW_PAIR "nb_fw_pair"           /* pair summaries (struct nb_psum) */
#define NB_MAP_FW_PORTS "nb_fw_ports"
#define NB_MAP_FW_PROTO "nb_fw_proto"
#define NB_MAP_FW_ICMP "nb_fw_icmp"
#define NB_MAP_FW_FLAGS "nb_fw_flags"
#define NB_MAP_SET4 "nb_set4"
#define NB_MAP_SET6 "nb_set6"
#define NB_MAP_SETH4 "nb_seth4"
#define NB_MAP_SETH6 "nb_seth6"
#define NB_MAP_FW_CNT "nb_fw_cnt"
#define NB_MAP_FW_STATS "nb_fw_stats"
#define NB_MAP_FW_RL "nb_fw_rl"
#define NB_MAP_FW_EVENTS "nb_fw_events"
#define NB_MAP_CT "nb_ct"
#define NB_MAP_CT_CFG "nb_ct_cfg"
#define NB_MAP_LB_VIPS "nb_lb_vips"
#define NB_MAP_LB_RING "nb_lb_ring"
#define NB_MAP_LB_BACKENDS "nb_lb_backends"
#define NB_MAP_LB_FLOWS "nb_lb_flows"
#define NB_MAP_LB_NAT "nb_lb_nat"
#define NB_MAP_LB_CNT "nb_lb_cnt"
#define NB_MAP_LB_JUMP "nb_lb_jump"           /* [0] = NB_PROG_LB_ENTRY, set after load */
#define NB_MAP_LB_VLIVE "nb_lb_vlive"         /* VIP signature per index: established flows */
#define NB_MAP_LB_PORTS "nb_lb_ports"         /* one bit per destination port a VIP uses */
#define NB_MAP_LB_NH "nb_lb_nh"               /* per-CPU next hop per backend, 1 s */
#define NB_MAP_REJ_JUMP "nb_rej_jump"         /* [0] = NB_PROG_REJ_XDP or NB_PROG_REJ_TC */
#define NB_MAP_REJ_SCRATCH "nb_rej_scratch"   /* per-CPU handoff to the reply builder */
#define NB_MAP_REJECT_RL "nb_reject_rl"       /* reply rate bucket (reject.h) */

#define NB_PROG_FW_XDP "nb_fw_xdp"            /* XDP ingress firewall */
#define NB_PROG_FW_TC_EG "nb_fw_tc_eg"        /* TC egress firewall */
#define NB_PROG_FW_TC_IN "nb_fw_tc_in"        /* TC ingress firewall (no XDP) */
#define NB_PROG_LB_ENTRY "nb_lb_entry"        /* the balancer, tail-called by nb_fw_xdp */
#define NB_PROG_REJ_XDP "nb_rej_xdp"          /* reject replies, tail-called by nb_fw_xdp */
#define NB_PROG_REJ_TC "nb_rej_tc"            /* reject replies, tail-called by the TC firewall */

/* ---- program shape, chosen per policy by the controller (-D on the bcc command line) ----
 * NB_WORDS: 64-bit words of a rule bit-vector, a power of two (1, 4, 16, 64 or 256: up to
 * 16384 terminal rules).
 * NB_CLASS_CAP: class vectors per generation. Rule edits that fit the shape only rewrite maps. */
#ifndef NB_WORDS
#define NB_WORDS 1
#endif
#ifndef NB_CLASS_CAP
#define NB_CLASS_CAP 64
#endif
/* NB_DIR_CHUNKS: 256-entry chunks of the address tables per generation (nb_fw_dir). */
#ifndef NB_DIR_CHUNKS
#define NB_DIR_CHUNKS 64
#endif
#define NB_SUM ((NB_WORDS + 63) / 64)       /* summary words: bit i set = word i may be non-zero */
/* NB_PAIR_CELLS: cells per generation of the pair summaries (nb_fw_pair): table 0 (source x
 * destination) in the first NB_PAIR0_CELLS, table 1 (an address x destination port) in the
 * next NB_PAIR1_CELLS. A program of NB_PAIR_MIN_WORDS words or more gets both; a smaller one a
 * 1-cell stub (its scan is short without them). */
#define NB_PAIRS 2
#define NB_PAIR_MIN_WORDS 16
#define NB_PAIR0_CELLS (1 << 18)
#define NB_PAIR1_CELLS (1 << 16)
#define NB_PAIR_CELLS (NB_WORDS >= NB_PAIR_MIN_WORDS ? NB_PAIR0_CELLS + NB_PAIR1_CELLS : 1)
#define NB_RULES_CAP (NB_WORDS * 64)        /* terminal rules per direction */

/* ---- fixed limits ---- */
#define NB_MAX_COUNT_RULES 64               /* 'count' rules per direction (one u64 bitmap) */
#define NB_MAX_SETREFS 4                    /* distinct (set, src|dst) references per direction */
#define NB_PREFIX_CAP 65536                 /* distinct rule prefixes per family per generation */
#define NB_DIR_MAX_CHUNKS 32768            /* NB_DIR_CHUNKS at most: 32 MiB per generation */
#define NB_SET_CAP (1 << 20)                /* set entries per family (old + new fit: map is 2x) */
#define NB_SLOT_CAP (2 * NB_RULES_CAP + 2 * NB_MAX_COUNT_RULES) /* counter slots */
#define NB_RL_ENTRIES 65536                 /* rate-limit buckets (LRU: oldest source evicted) */
#define NB_MAX_VLANS 2                      /* 802.1Q / 802.1ad tags parsed */
#define NB_MAX_EXTHDRS 6                    /* IPv6 extension headers skipped to reach L4 */

/* ---- actions (nb_rule.action, nb_fw_cfg.default_action) ---- */
#define NB_ACT_ALLOW 1
#define NB_ACT_DROP 2
#define NB_ACT_RATE 3                       /* token bucket: within rate allow, over rate drop */
#define NB_ACT_REJECT 4                     /* drop and answer: TCP RST, else port unreachable */

/* ---- reject replies (reject.h) ---- */
#define NB_REJECT_PPS 1000                  /* replies per second, all CPUs together */
#define NB_REJECT_BURST 100                 /* replies sent back to back before the rate holds */
#define NB_REJECT_QUOTE 64                  /* bytes of the refused packet an ICMP error quotes */

#define NB_RL_PER_SRC 0                     /* one bucket per (rule, source address) */
#define NB_RL_PER_RULE 1                    /* one bucket per rule */

/* ---- classifier fields: per-field lookup -> class id -> bit-vector ---- */
#define NB_F_SRC 0
#define NB_F_DST 1
#define NB_F_PROTO 2
#define NB_F_SPORT 3
#define NB_F_DPORT 4
#define NB_F_ICMP 5                         /* (type << 8) | code, ICMP and ICMPv6 */
#define NB_F_FLAGS 6                        /* TCP flags byte (FIN=0x01 ... CWR=0x80) */
#define NB_F_SET0 7                         /* NB_F_SET0 + k: set reference k (member or not) */
#define NB_NFIELDS_BASE 7
#define NB_NFIELDS (NB_NFIELDS_BASE + NB_MAX_SETREFS)

#define NB_CLASS_ALL 0                      /* class id 0 is all-ones: the field is not looked up */

/* Address tables (nb_fw_dir, u32 entries), per generation gen at gen * NB_DIR_GEN: four
 * roots of 65,536 entries indexed by the first 16 address bits (root (field << 1) | is_ipv6),
 * then NB_DIR_CHUNKS chunks of 256 indexed by the next byte. An entry is a class id, or
 * NB_DIR_PTR | chunk number: go one byte deeper. netbpf/dirtable.py builds them. */
#define NB_DIR_ROOT 65536
#define NB_DIR_PTR 0x80000000
#define NB_DIR_GEN (4 * NB_DIR_ROOT + 256 * NB_DIR_CHUNKS)


/* ---- global statistics (nb_fw_stats index) ---- */
#define NB_STAT_PASS 0                      /* packets passed (any reason) */
#define NB_STAT_DROP 1                      /* packets dropped (any reason) */
#define NB_STAT_DEFAULT 2                   /* no terminal rule matched: default action applied */
#define NB_STAT_NONIP 3                     /* not IPv4/IPv6: always passed, never classified */
#define NB_STAT_MALFORMED 4                 /* truncated/invalid headers: dropped */
#define NB_STAT_FRAGMENT 5                  /* non-first fragments classified without L4 */
#define NB_STAT_RATE_DROP 6                 /* dropped by a rate_limit rule over its rate */
#define NB_STAT_CT_REPLY 7                  /* passed as a reply of a tracked connection */
#define NB_STAT_LB_TX 8                     /* balanced, sent back out the same interface */
#define NB_STAT_LB_REDIRECT 9               /* balanced, redirected to another interface */
#define NB_STAT_LB_STACK 10                 /* balanced (NAT), forwarded by the kernel */
#define NB_STAT_LB_DROP 11                  /* VIP packet with no backend or no route */
#define NB_STAT_REJECT 12                   /* reject replies sent (XDP_TX or redirected) */
#define NB_STAT_MAX 13

/* ---- map layouts ---- */
struct nb_gen {                             /* nb_fw_gen[0]: the one value an apply flips */
    __u32 gen;                              /* 0 or 1 */
};

/* nb_setref.field flags: this family's entries are all full-length addresses, kept in the
 * hash map nb_seth4/nb_seth6 (one lookup) instead of the prefix trie nb_set4/nb_set6 */
#define NB_SETREF_HASH4 0x100
#define NB_SETREF_HASH6 0x200

struct nb_setref {
    __u32 tag;                              /* key tag of the set's entries in its map */
    __u32 field;                            /* NB_F_SRC or NB_F_DST (low byte) | NB_SETREF_HASH* */
    __u32 member_id;                        /* class when the address is in the set */
    __u32 nonmember_id;                     /* class when it is not */
};

/* Pair summaries: two fields' classes (table 0: source and destination; table 1: the address
 * field with fewer classes and the destination port) are numbered in two ranges, each in
 * value order; rank = id - base. Ranks are grouped (rank >> shift) so rows x cols fit the
 * table, and the cell (row, col) holds the summary of (OR of the row's vectors) AND (OR of the
 * column's vectors): bit i clear = no rule of word i takes both values. A superset of the
 * true pair summary, so the scan skips words, never rules. */
struct nb_pair_cfg {
    __u32 on;                               /* 0: this table is not used in this generation */
    __u32 cols;                             /* cells per row */
    __u32 field[2];                         /* NB_F_* of the rows / columns */
    __u32 base[2];                          /* first class id of each range */
    __u32 n[2];                             /* class ids in each range */
    __u32 shift[2];                         /* rank >> shift = row / column */
};

struct nb_psum {                            /* nb_fw_pair[gen * NB_PAIR_CELLS + table's first + row * cols + col] */
    __u64 sum[NB_SUM];
};

struct nb_fw_cfg {                          /* nb_fw_cfg[gen] */
    __u32 field_mask;                       /* bit f: field f is looked up, else NB_CLASS_ALL */
    __u32 wild_id[NB_NFIELDS_BASE];         /* class when the value is absent or uncovered */
    __u32 nsetrefs;
    __u32 nrules;                           /* terminal rules in this generation */
    __u32 ncount;                           /* count rules in this generation */
    __u32 default_action;                   /* NB_ACT_ALLOW or NB_ACT_DROP */
    struct nb_setref setref[NB_MAX_SETREFS];
    __u32 default_sample;                   /* events for packets taking the default action */
    __u32 pad;
    struct nb_pair_cfg pair[NB_PAIRS];
};

struct nb_rule {                            /* nb_fw_rules[gen * NB_RULES_CAP + t] */
    __u32 action;                           /* NB_ACT_* */
    __u32 slot;                             /* nb_fw_cnt index */
    __u64 count_mask;                       /* count rules (by index) placed before this rule */
    __u64 rl_rate;                          /* NB_ACT_RATE: packets per second */
    __u64 rl_burst;                         /* NB_ACT_RATE: bucket depth in packets */
    __u32 rl_per;                           /* NB_RL_PER_* */
    __u32 sample;                           /* 1 in `sample` packets becomes an event; 0 never */
};

struct nb_vec {                             /* nb_fw_vecs[gen * NB_CLASS_CAP + id] */
    __u64 count;                            /* count rules matching this class */
    __u64 sum[NB_SUM];                      /* bit i: w[i] != 0 */
    __u64 w[NB_WORDS];                      /* terminal rules matching this class */
};

struct nb_lpm4_key {                        /* nb_set4 */
    __u32 prefixlen;                        /* 32 (tag) + prefix length */
    __u32 tag;
    __u8 addr[4];
};

struct nb_lpm6_key {                        /* nb_set6 */
    __u32 prefixlen;
    __u32 tag;
    __u8 addr[16];
};

struct nb_seth4_key {                       /* nb_seth4: a set of IPv4 /32s */
    __u32 tag;
    __u8 addr[4];
};

struct nb_seth6_key {                       /* nb_seth6: a set of IPv6 /128s */
    __u32 tag;
    __u8 addr[16];
};

struct nb_counter {                         /* nb_fw_cnt[slot], nb_fw_stats[NB_STAT_*]; per CPU */
    __u64 packets;
    __u64 bytes;
    __u64 drops;                            /* rate_limit rules: packets dropped over the rate */
};

struct nb_rl_key {
    __u32 slot;
    __u32 family;                           /* 4, 6, or 0 for NB_RL_PER_RULE */
    __u8 addr[16];
};

struct nb_rl_state {
    __u64 tokens;                           /* nanopackets: 1e9 = one packet */
    __u64 last_ns;
};

/* ---- sampled packet events (nb_fw_events ring buffer, read by `netbpf events`) ---- */
#define NB_EVENTS_PAGES 64                  /* 256 KiB: events are dropped, never blocking */
#define NB_EVENT_DEFAULT 0xffffffff         /* nb_event.slot when the default action applied */

struct nb_event {
    __u64 ts_ns;                            /* bpf_ktime_get_ns() */
    __u32 slot;                             /* counter slot of the rule, or NB_EVENT_DEFAULT */
    __u32 len;                              /* packet length */
    __u8 action;                            /* what happened: NB_ACT_ALLOW or NB_ACT_DROP */
    __u8 rate_limited;
    __u8 family;
    __u8 proto;
    __u16 sport;                            /* host order; 0 without ports */
    __u16 dport;
    __u8 src[16];
    __u8 dst[16];
};

/* ---- connection tracking (nb_ct, shared by the ingress and egress programs via a pin) ----
 * Entries are made only by egress (connections this side starts), so a flood from outside
 * cannot fill the table; LRU eviction drops the least recently used flows when it is full. */
#define NB_CT_ENTRIES 65536

#define NB_CT_SYN_SENT 1                    /* TCP: our SYN went out, no SYN-ACK yet */
#define NB_CT_ESTABLISHED 2                 /* TCP after SYN-ACK; UDP and ICMP echo once sent */
#define NB_CT_CLOSING 3                     /* TCP: FIN seen either way */

#define NB_CT_T_TCP_SYN 0                   /* nb_ct_cfg.timeout_ns index */
#define NB_CT_T_TCP_EST 1
#define NB_CT_T_TCP_CLOSE 2
#define NB_CT_T_UDP 3
#define NB_CT_T_ICMP 4
#define NB_CT_NTIMEOUTS 5

struct nb_ct_key {                          /* as the connection's first packet went out */
    __u8 family;
    __u8 proto;
    __u16 sport;                            /* ICMP echo: the identifier; dport 0 */
    __u16 dport;
    __u16 pad;
    __u8 saddr[16];                         /* this side */
    __u8 daddr[16];                         /* the peer */
};

struct nb_ct_val {
    __u64 last_ns;                          /* bpf_ktime_get_ns() of the last packet either way */
    __u64 packets;
    __u32 state;                            /* NB_CT_* */
    __u32 pad;
};

struct nb_ct_cfg {                          /* nb_ct_cfg[0] */
    __u64 timeout_ns[NB_CT_NTIMEOUTS];
};

/* ---- L4 load balancer (XDP on the VIP's interface; reverse NAT on its TC egress) ---- */
#define NB_LB_MAX_VIPS 256
#define NB_LB_MAX_BACKENDS 4096
#define NB_LB_FLOWS 262144                  /* LRU: the least recently used flow is forgotten */
#ifndef NB_LB_RING_CAP
#define NB_LB_RING_CAP (1 << 19)            /* Maglev slots, both halves of every VIP's table */
#endif
#define NB_LB_NO_BACKEND 0xffffffff
#define NB_LB_NAT 1
#define NB_LB_DSR 2
#define NB_BE_ACTIVE 1                      /* flows may stay on it (draining backends too) */

struct nb_vip_key {
    __u8 family;
    __u8 proto;
    __u16 port;                             /* host order */
    __u8 addr[16];
};

struct nb_vip {                             /* replaced whole: a packet sees one table */
    __u32 index;                            /* counters: nb_lb_cnt[index] */
    __u32 mode;                             /* NB_LB_NAT or NB_LB_DSR */
    __u32 ring_off;                         /* this VIP's live Maglev table in nb_lb_ring */
    __u32 ring_size;                        /* prime */
    __u64 idle_ns;                          /* a flow idle longer is balanced again (Maglev) */
    __u64 touch_ns;                         /* nb_flow.last_ns is rewritten only when older */
    __u32 sig;                              /* the VIP's identity (key, mode); never 0 */
    __u32 pad;
};

struct nb_vip_live {                        /* nb_lb_vlive[vip index]: what established flows
                                             * check, so they need no VIP hash lookup */
    __u32 sig;                              /* nb_vip.sig of the VIP at this index; 0 = none */
    __u32 pad;
    __u64 idle_ns;
    __u64 touch_ns;
};

struct nb_backend {                         /* nb_lb_backends[id] */
    __u8 family;
    __u8 pad;
    __u16 port;                             /* host order */
    __u32 flags;                            /* NB_BE_ACTIVE */
    __u8 addr[16];
};

struct nb_flow_key {                        /* client -> VIP, as the client sent it */
    __u8 family;
    __u8 proto;
    __u16 sport;
    __u16 dport;
    __u16 pad;
    __u8 saddr[16];
    __u8 daddr[16];
};

struct nb_flow {
    __u32 backend;
    __u32 vip_index;
    __u64 last_ns;                          /* bpf_ktime_get_coarse_ns(), <= touch_ns stale */
    __u32 vip_sig;                          /* nb_vip.sig when made: the VIP changed if not equal */
    __u32 mode;                             /* NB_LB_NAT or NB_LB_DSR, as the VIP had it */
};

#define NB_LB_PORT_WORDS 1024               /* nb_lb_ports: one bit per destination port */
#define NB_LB_NH_TTL_NS 1000000000ULL       /* a cached next hop is looked up again after 1 s */
#define NB_LB_NH_STACK 1                    /* nb_lb_nh.kind: the kernel forwards it (XDP_PASS) */
#define NB_LB_NH_TX 2                       /* out the interface it came in on (XDP_TX) */
#define NB_LB_NH_REDIRECT 3                 /* out another interface (bpf_redirect) */

struct nb_lb_nh {                           /* nb_lb_nh[backend], per CPU: its next hop */
    __u64 stamp_ns;                         /* when looked up; 0 = never */
    __u32 kind;                             /* NB_LB_NH_* */
    __u32 in_ifindex;                       /* the interface the lookup was made for */
    __u32 out_ifindex;
    __u16 mtu;                              /* larger packets take the full FIB lookup */
    __u8 smac[6];
    __u8 dmac[6];
    __u8 dsr;                               /* the answer differs for DSR and NAT */
    __u8 pad[5];
    __u8 dst[16];                           /* the backend address it was looked up for */
};

struct nb_nat_key {                         /* a backend's reply, as it leaves toward the client */
    __u8 family;
    __u8 proto;
    __u16 bport;                            /* backend port (source of the reply) */
    __u16 cport;                            /* client port */
    __u16 pad;
    __u8 baddr[16];
    __u8 caddr[16];
};

struct nb_nat_val {
    __u16 vport;                            /* host order */
    __u16 pad[3];
    __u8 vaddr[16];
};

struct nb_lb_counter {                      /* nb_lb_cnt[vip index] and [NB_LB_MAX_VIPS + backend] */
    __u64 packets;
    __u64 bytes;
    __u64 conns;                            /* new flows */
};

/* ---- sizes the controller packs to (netbpf/abi.py) ---- */
_Static_assert(sizeof(struct nb_gen) == 4, "nb_gen");
_Static_assert(sizeof(struct nb_setref) == 16, "nb_setref");
_Static_assert(sizeof(struct nb_pair_cfg) == 40, "nb_pair_cfg");
_Static_assert(sizeof(struct nb_fw_cfg) == 200, "nb_fw_cfg");
_Static_assert(sizeof(struct nb_psum) == 8 * NB_SUM, "nb_psum");
_Static_assert(sizeof(struct nb_rule) == 40, "nb_rule");
_Static_assert(sizeof(struct nb_vec) == 8 * (1 + NB_SUM + NB_WORDS), "nb_vec");
_Static_assert(sizeof(struct nb_lpm4_key) == 12, "nb_lpm4_key");
_Static_assert(sizeof(struct nb_lpm6_key) == 24, "nb_lpm6_key");
_Static_assert(sizeof(struct nb_seth4_key) == 8, "nb_seth4_key");
_Static_assert(sizeof(struct nb_seth6_key) == 20, "nb_seth6_key");
_Static_assert(sizeof(struct nb_counter) == 24, "nb_counter");
_Static_assert(sizeof(struct nb_rl_key) == 24, "nb_rl_key");
_Static_assert(sizeof(struct nb_rl_state) == 16, "nb_rl_state");
_Static_assert(sizeof(struct nb_event) == 56, "nb_event");
_Static_assert(sizeof(struct nb_ct_key) == 40, "nb_ct_key");
_Static_assert(sizeof(struct nb_ct_val) == 24, "nb_ct_val");
_Static_assert(sizeof(struct nb_ct_cfg) == 8 * NB_CT_NTIMEOUTS, "nb_ct_cfg");
_Static_assert(sizeof(struct nb_vip_key) == 20, "nb_vip_key");
_Static_assert(sizeof(struct nb_vip) == 40, "nb_vip");
_Static_assert(sizeof(struct nb_vip_live) == 24, "nb_vip_live");
_Static_assert(sizeof(struct nb_backend) == 24, "nb_backend");
_Static_assert(sizeof(struct nb_flow_key) == 40, "nb_flow_key");
_Static_assert(sizeof(struct nb_flow) == 24, "nb_flow");
_Static_assert(sizeof(struct nb_lb_nh) == 56, "nb_lb_nh");
_Static_assert(sizeof(struct nb_nat_key) == 40, "nb_nat_key");
_Static_assert(sizeof(struct nb_nat_val) == 24, "nb_nat_val");
_Static_assert(sizeof(struct nb_lb_counter) == 24, "nb_lb_counter");

/* Array index helpers: generation-scoped arrays hold both generations side by side. */
#define NB_PORT_IDX(gen, which, port) (((__u32)(gen) << 17) | ((__u32)(which) << 16) | (__u32)(port))
#define NB_PROTO_IDX(gen, proto) (((__u32)(gen) << 8) | (__u32)(proto))
#define NB_ICMP_IDX(gen, tc) (((__u32)(gen) << 16) | (__u32)(tc))
#define NB_FLAGS_IDX(gen, flags) (((__u32)(gen) << 8) | (__u32)(flags))

#endif
