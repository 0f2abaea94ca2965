/* ambient eBPF capture: the iptables-free equivalent of the in-pod rules (contract C.3).
 *
 * Compiled by bcc (bpf/loader.py) against a uapi-only header tree: include only <uapi/...>,
 * touch no kernel-internal struct.  The loader substitutes the pin directory.
 *
 * Pods are enrolled by network-namespace cookie: the cgroup programs do nothing in a netns
 * that is not in `amb_enrolled`.
 *
 * Outbound (cgroup programs, attached once per node):
 *   amb_connect4   TCP connect() in an enrolled netns, without ztunnel's mark, to neither
 *                  loopback, nor the pod's own IP, nor the probe-SNAT IP: remember the
 *                  original destination by socket cookie and send the socket to POD_IP:15001.
 *   amb_sockops    at TCP_CONNECT_CB (source port known, SYN not yet sent) move the entry to
 *                  the key ztunnel can compute from its accepted socket: (netns cookie,
 *                  client ip, client port); delete it when the socket closes.
 *   amb_getpeer4   the application's getpeername() shows the original destination.
 * Inbound (tc, per pod interface):
 *   amb_tc_in      TCP SYN not to 15008 and not from the probe-SNAT IP: hand it to the 15006
 *                  listener of this netns with bpf_sk_assign (the accepted socket keeps the
 *                  original destination as its local address); no listener: drop.
 *   amb_tc_vin[3]  on a virtual interface (istio.io/reroute-virtual-interfaces), ingress: TCP
 *                  packets get mark 0x111 (so the policy rule routes them, whatever their
 *                  destination, to the local stack) and SYNs are handed to the 15001 listener
 *                  (which needs IP_TRANSPARENT to answer from a foreign address); no
 *                  listener: drop.  "3": for L3 devices (tun) without an Ethernet header.
 *   amb_tc_lo      on lo: ztunnel's mark 0x539 becomes 0x111 so that, with
 *                  net.ipv4.tcp_fwmark_accept=1, the app's accepted socket carries 0x111 and
 *                  its replies to a spoofed client address are policy-routed back to ztunnel.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

#define AMB_OUTBOUND_PORT 15001
#define AMB_INBOUND_PORT 15006
#define AMB_HBONE_PORT 15008
#define AMB_MARK 0x539
#define AMB_CONNMARK 0x111
#define AMB_MARK_MASK 0xfff
#define AMB_PROBE_SNAT 0xa9fe077f /* 169.254.7.127, host order */
#define AMB_SOCK_STREAM 1

struct amb_pod {
    __u32 ip;     /* network order; 0: no IPv4 known, redirect to 127.0.0.1 */
    __u32 flags;  /* reserved */
    __u64 uid;    /* hash of the pod UID: lets the agent remove entries of deleted netns */
};

struct amb_addr {
    __u32 ip;     /* network order */
    __u16 port;   /* network order */
    __u16 pad;
};

struct amb_conn_key {
    __u64 netns;  /* netns cookie */
    __u32 ip;     /* client ip, network order */
    __u16 port;   /* client port, network order */
    __u16 pad;
};

BPF_TABLE_PINNED("hash", __u64, struct amb_pod, amb_enrolled, 65536,
                 "AMB_PIN_DIR/amb_enrolled");
BPF_TABLE_PINNED("lru_hash", __u64, struct amb_addr, amb_pending, 65536,
                 "AMB_PIN_DIR/amb_pending");
BPF_TABLE_PINNED("lru_hash", struct amb_conn_key, struct amb_addr, amb_origdst, 262144,
                 "AMB_PIN_DIR/amb_origdst");

static __always_inline int amb_skip_dst(__u32 dst, __u32 pod_ip)
{
    __u32 host = bpf_ntohl(dst);
    if ((host >> 24) == 127)
        return 1;
    if (dst == pod_ip)
        return 1;
    if (host == AMB_PROBE_SNAT)
        return 1;
    return 0;
}

int amb_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != AMB_SOCK_STREAM)
        return 1;
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct amb_pod *pod = amb_enrolled.lookup(&netns);
    if (!pod)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    if ((sk->mark & AMB_MARK_MASK) == AMB_MARK)
        return 1;
    __u32 dst = ctx->user_ip4;
    if (amb_skip_dst(dst, pod->ip))
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct amb_addr orig = {};
    orig.ip = dst;
    orig.port = (__u16)ctx->user_port;
    amb_pending.update(&cookie, &orig);
    ctx->user_ip4 = pod->ip ? pod->ip : bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons(AMB_OUTBOUND_PORT);
    return 1;
}

int amb_sockops(struct bpf_sock_ops *skops)
{
    __u32 op = skops->op;
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        __u64 cookie = bpf_get_socket_cookie(skops);
        struct amb_addr *orig = amb_pending.lookup(&cookie);
        if (!orig)
            return 1;
        struct amb_conn_key key = {};
        key.netns = bpf_get_netns_cookie(skops);
        key.ip = skops->local_ip4;
        key.port = bpf_htons((__u16)skops->local_port);
        struct amb_addr val = *orig;
        amb_origdst.update(&key, &val);
        amb_pending.delete(&cookie);
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
                                  BPF_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    }
    if (op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == BPF_TCP_CLOSE) {
        struct amb_conn_key key = {};
        key.netns = bpf_get_netns_cookie(skops);
        key.ip = skops->local_ip4;
        key.port = bpf_htons((__u16)skops->local_port);
        amb_origdst.delete(&key);
    }
    return 1;
}

int amb_getpeer4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != AMB_SOCK_STREAM)
        return 1;
    if (ctx->user_port != bpf_htons(AMB_OUTBOUND_PORT))
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct amb_conn_key key = {};
    key.netns = bpf_get_netns_cookie(ctx);
    key.ip = sk->src_ip4;
    key.port = bpf_htons((__u16)sk->src_port);
    struct amb_addr *orig = amb_origdst.lookup(&key);
    if (!orig)
        return 1;
    ctx->user_ip4 = orig->ip;
    ctx->user_port = orig->port;
    return 1;
}

/* Hand the packet to this netns's TCP listener on `port`; none: drop (fail closed). */
static __always_inline int amb_assign(struct __sk_buff *skb, __u32 daddr, __u16 port)
{
    /* Source 0:0 never matches an established socket, so this finds the listener. */
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.daddr = daddr;
    tuple.ipv4.dport = bpf_htons(port);
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
                                             BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return TC_ACT_SHOT;
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return TC_ACT_SHOT;
    }
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    return err == 0 ? TC_ACT_OK : TC_ACT_SHOT;
}

int amb_tc_in(struct __sk_buff *skb)
{
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_OK;
    struct iphdr *iph = (void *)(eth + 1);
    if ((void *)(iph + 1) > data_end)
        return TC_ACT_OK;
    if (iph->protocol != IPPROTO_TCP)
        return TC_ACT_OK;
    __u32 ihl = iph->ihl * 4;
    if (ihl < sizeof(*iph))
        return TC_ACT_OK;
    struct tcphdr *th = (void *)iph + ihl;
    if ((void *)(th + 1) > data_end)
        return TC_ACT_OK;
    if (!th->syn || th->ack)
        return TC_ACT_OK;  /* established flows find their own socket */
    if (th->dest == bpf_htons(AMB_HBONE_PORT))
        return TC_ACT_OK;
    if (iph->saddr == bpf_htonl(AMB_PROBE_SNAT))
        return TC_ACT_OK;
    if ((skb->mark & AMB_MARK_MASK) == AMB_MARK)
        return TC_ACT_OK;
    return amb_assign(skb, iph->daddr, AMB_INBOUND_PORT);
}

int amb_tc_lo(struct __sk_buff *skb)
{
    if ((skb->mark & AMB_MARK_MASK) != AMB_MARK)
        return TC_ACT_OK;
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct iphdr *iph = data + sizeof(struct ethhdr);
    if ((void *)(iph + 1) > data_end || iph->protocol != IPPROTO_TCP)
        return TC_ACT_OK;
    skb->mark = (skb->mark & ~AMB_MARK_MASK) | AMB_CONNMARK;
    return TC_ACT_OK;
}


static __always_inline int amb_vin(struct __sk_buff *skb, __u32 l3)
{
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct iphdr *iph = data + l3;
    if ((void *)(iph + 1) > data_end || iph->protocol != IPPROTO_TCP)
        return TC_ACT_OK;
    __u32 ihl = iph->ihl * 4;
    if (ihl < sizeof(*iph) || ihl > 60)
        return TC_ACT_OK;
    struct tcphdr *th = data + l3 + ihl;
    if ((void *)(th + 1) > data_end)
        return TC_ACT_OK;
    skb->mark = (skb->mark & ~AMB_MARK_MASK) | AMB_CONNMARK;
    if (!th->syn || th->ack)
        return TC_ACT_OK;
    return amb_assign(skb, iph->daddr, AMB_OUTBOUND_PORT);
}

int amb_tc_vin(struct __sk_buff *skb) { return amb_vin(skb, sizeof(struct ethhdr)); }
int amb_tc_vin3(struct __sk_buff *skb) { return amb_vin(skb, 0); }
