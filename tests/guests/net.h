/* Polling virtio-net driver for the test guests. */
#ifndef KUBEVMM_NET_H
#define KUBEVMM_NET_H
#include "guest.h"

#define NET_HDR 12
struct net {
	u64 base;
	struct vq rx, tx;
	u8 mac[6];
};
/* Returns 0 when there is no NIC. */
int net_init(struct net *n);
/* Waits for one frame (without the virtio header); returns its length. */
u32 net_recv(struct net *n, u8 **frame);
/* Gives the last received buffer back to the device. */
void net_recv_done(struct net *n);
void net_send(struct net *n, const u8 *frame, u32 len);
/* Returns 1 when frame f is an ARP request for ip. */
int net_is_arp_request(const u8 *f, u32 len, const u8 ip[4]);
/* Fills reply (42 bytes) with the ARP reply to request req. */
void net_build_arp_reply(const struct net *n, const u8 *req, const u8 ip[4], u8 reply[42]);
/* Answers ARP requests for ip; returns after the first answer. */
void net_answer_arp(struct net *n, const u8 ip[4]);
#endif
