/* Polling virtio-net driver for the test guests, and the Ethernet, ARP and
 * IPv4 helpers the network guests share. */
#ifndef KUBEVMM_NET_H
#define KUBEVMM_NET_H
#include "guest.h"

#define NET_HDR 12
/* Largest frame the guests send or accept (Ethernet header + 1500). */
#define NET_FRAME_MAX 1514
struct net {
	u64 base;
	struct vq rx, tx;
	u8 mac[6];
};
/* Returns 0 when there is no NIC. */
int net_init(struct net *n);
/* The same for the NIC at base (0: none). */
int net_init_at(struct net *n, u64 base);
/* Waits for one frame (without the virtio header); returns its length,
 * bounded by the receive buffer. */
u32 net_recv(struct net *n, u8 **frame);
/* Like net_recv without waiting: returns 0 when no frame is there yet. */
int net_poll(struct net *n, u8 **frame, u32 *len);
/* Gives the last received buffer back to the device. */
void net_recv_done(struct net *n);
void net_send(struct net *n, const u8 *frame, u32 len);
/* Sends the first len bytes of the last received frame (as changed by the
 * caller) from the receive buffer itself, without a copy; call before
 * net_recv_done. */
void net_send_received(struct net *n, u32 len);
/* Returns 1 when frame f is an Ethernet/IPv4 ARP packet (42 bytes or more). */
int net_is_arp(const u8 *f, u32 len);
/* Returns 1 when frame f is an ARP request for ip. */
int net_is_arp_request(const u8 *f, u32 len, const u8 ip[4]);
/* Fills reply (42 bytes) with the ARP reply to request req. */
void net_build_arp_reply(const struct net *n, const u8 *req, const u8 ip[4], u8 reply[42]);
/* Answers ARP requests for ip; returns after the first answer. */
void net_answer_arp(struct net *n, const u8 ip[4]);

/* Unaligned 16- and 32-bit access (fine on x86): one instruction where a
 * byte loop takes dozens, which matters under software KVM. */
typedef u16 __attribute__((may_alias, aligned(1))) u16_ua;
typedef u32 __attribute__((may_alias, aligned(1))) u32_ua;

/* Byte order. */
static inline u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline u32 be32(const u8 *p)
{
	return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3];
}
static inline void put_be16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static inline void put_be32(u8 *p, u32 v)
{
	p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v;
}

/* Internet checksum: one's-complement sum of big-endian 16-bit words, then
 * folded and complemented. Verifying a whole header gives 0 when correct. */
u32 csum_add(u32 sum, const u8 *p, usize n);
u16 csum_fold(u32 sum);
/* UDP or TCP checksum over the pseudo header (addresses from IPv4 header ip)
 * and len bytes of l4. */
u16 l4_csum(const u8 *ip, u8 proto, const u8 *l4, u32 len);

extern const u8 mac_broadcast[6];
/* Fills a 42-byte ARP frame (op 1 request, 2 reply). */
void net_build_arp(u8 f[42], u16 op, const u8 eth_dst[6], const u8 eth_src[6],
		   const u8 sha[6], const u8 spa[4], const u8 tha[6], const u8 tpa[4]);

/* An IPv4 packet inside a received frame, every length checked. */
struct ipv4_pkt {
	const u8 *ip;   /* header, IHL * 4 bytes */
	const u8 *l4;   /* payload */
	u32 l4_len;     /* from the total length, within the frame */
	u8 proto;
};
/* Returns 1 when f (len bytes) is an unfragmented IPv4 packet whose IHL and
 * total length fit in the frame and whose header checksum is right. */
int ipv4_parse(const u8 *f, u32 len, struct ipv4_pkt *p);
/* Fills the Ethernet and IPv4 headers (34 bytes, no options, don't
 * fragment, TTL 64, header checksum) of a frame carrying l4_len bytes. */
void ipv4_header(u8 *f, const u8 eth_dst[6], const u8 eth_src[6], const u8 src[4],
		 const u8 dst[4], u8 proto, u32 l4_len);
/* Parses a dotted quad ("10.0.0.1"); returns 1 when well formed. */
int ip_parse(const char *s, u8 ip[4]);
void put_ip(const u8 ip[4]);
void put_mac(const u8 mac[6]);

/* Time from the TSC, whose rate is assumed (2500 MHz unless set). */
void clock_set_tsc_mhz(u64 mhz);
u64 clock_ms(void);
#endif
