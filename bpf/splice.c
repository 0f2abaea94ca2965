/* ambient kernel splice: the kernel moves the bytes of a same-node connection that ztunnel
 * relays between two sockets it owns (`a` towards the client app, `b` towards the server app).
 *
 * Compiled by bcc (bpf/splice.py) against a uapi-only header tree: include only <uapi/...>,
 * touch no kernel-internal struct.  The loader substitutes AMB_SPLICE_MAX_ENTRIES.
 *
 * Two SOCKHASH maps keyed by socket cookie, both filled by ztunnel (ambient/splicemap.py):
 * amb_splice_peer  redirect targets, no program attached: `a` under cookie(b) and `b` under
 *                  cookie(a), so the entry under a socket's own cookie is its peer.  Filled
 *                  first, for both sockets, before any verdict runs: a failed insert can be
 *                  undone without a byte having moved.
 * amb_splice       membership: each socket under its own cookie.  The verdict program is
 *                  attached to this map, so inserting a socket here is what turns the kernel
 *                  splice on for it (and deleting it turns it off again, while the socket's
 *                  psock, held by amb_splice_peer, keeps any bytes it had passed locally).
 * amb_splice_v     SK_SKB stream verdict (no stream parser: every skb is judged as it comes):
 *                  redirect to the egress of the peer.  When there is no peer entry it returns
 *                  SK_PASS so the bytes stay in the receiving socket for ztunnel to read and
 *                  forward; bpf_sk_redirect_hash's own SK_DROP would consume and lose them.
 * Both maps are created with the same max_entries and entries go in pairs (peer first, out
 * last), so amb_splice cannot be full when amb_splice_peer took a pair.
 */
#include <uapi/linux/bpf.h>

BPF_SOCKHASH(amb_splice_peer, __u64, AMB_SPLICE_MAX_ENTRIES);
BPF_SOCKHASH(amb_splice, __u64, AMB_SPLICE_MAX_ENTRIES);

int amb_splice_v(struct __sk_buff *skb)
{
    __u64 key;

    /* A bare FIN (TCP already took it into account) comes as an empty skb: redirected, the
     * peer's psock would try to send 0 bytes, take that for a broken pipe (EPIPE) and stop
     * sending.  Nothing to carry: drop it. */
    if (skb->len == 0)
        return SK_DROP;
    key = bpf_get_socket_cookie(skb);
    /* On success the redirect is recorded in the skb and SK_PASS applies it; on failure
     * nothing is recorded and SK_PASS delivers the skb to the socket itself. */
    amb_splice_peer.sk_redirect_hash(skb, &key, 0);
    return SK_PASS;
}
