/* Polling virtio-net driver: one RX buffer, one TX buffer. */
#include "net.h"

static u8 rxq_area[3 * 4096] __attribute__((aligned(4096)));
static u8 txq_area[3 * 4096] __attribute__((aligned(4096)));
static u8 rx_buf[2048];
static u8 tx_buf[2048];

static void rx_post(struct net *n)
{
	n->rx.desc[0].addr = (u64)rx_buf;
	n->rx.desc[0].len = sizeof(rx_buf);
	n->rx.desc[0].flags = VRING_DESC_F_WRITE;
	n->rx.avail->ring[n->rx.avail_idx % n->rx.size] = 0;
	barrier();
	n->rx.avail_idx++;
	n->rx.avail->idx = n->rx.avail_idx;
	virtio_notify(n->base, 0);
}

int net_init(struct net *n)
{
	int i;
	n->base = virtio_find(1);
	if (!n->base)
		return 0;
	virtio_init(n->base, 1u << 5 /* MAC */);
	for (i = 0; i < 6; i++)
		n->mac[i] = mmio_read8(n->base + 0x100 + (u64)i);
	virtio_setup_queue(n->base, 0, &n->rx, rxq_area, 8);
	virtio_setup_queue(n->base, 1, &n->tx, txq_area, 8);
	virtio_driver_ok(n->base);
	rx_post(n);
	return 1;
}

u32 net_recv(struct net *n, u8 **frame)
{
	u32 len = vq_wait_used(&n->rx);
	*frame = rx_buf + NET_HDR;
	return len > NET_HDR ? len - NET_HDR : 0;
}

void net_recv_done(struct net *n)
{
	rx_post(n);
}

void net_send(struct net *n, const u8 *frame, u32 len)
{
	memset(tx_buf, 0, NET_HDR);
	memcpy(tx_buf + NET_HDR, frame, len);
	n->tx.desc[0].addr = (u64)tx_buf;
	n->tx.desc[0].len = NET_HDR + len;
	n->tx.desc[0].flags = 0;
	n->tx.avail->ring[n->tx.avail_idx % n->tx.size] = 0;
	barrier();
	n->tx.avail_idx++;
	n->tx.avail->idx = n->tx.avail_idx;
	virtio_notify(n->base, 1);
	vq_wait_used(&n->tx);
}

int net_is_arp_request(const u8 *f, u32 len, const u8 ip[4])
{
	/* Ethernet type ARP, opcode request, target protocol address ip. */
	return len >= 42 && f[12] == 0x08 && f[13] == 0x06 && f[21] == 1 && !memcmp(f + 38, ip, 4);
}

void net_build_arp_reply(const struct net *n, const u8 *req, const u8 ip[4], u8 reply[42])
{
	memcpy(reply, req + 6, 6);          /* to the asker */
	memcpy(reply + 6, n->mac, 6);
	memcpy(reply + 12, req + 12, 8);    /* type, htype, ptype, sizes */
	reply[20] = 0;
	reply[21] = 2;                      /* reply */
	memcpy(reply + 22, n->mac, 6);      /* sender: us */
	memcpy(reply + 28, ip, 4);
	memcpy(reply + 32, req + 22, 10);   /* target: the asker */
}

void net_answer_arp(struct net *n, const u8 ip[4])
{
	u8 *f, reply[42];
	u32 len;
	for (;;) {
		len = net_recv(n, &f);
		if (net_is_arp_request(f, len, ip)) {
			net_build_arp_reply(n, f, ip, reply);
			net_recv_done(n);
			net_send(n, reply, sizeof(reply));
			return;
		}
		net_recv_done(n);
	}
}
