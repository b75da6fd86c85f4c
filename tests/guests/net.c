/* Polling virtio-net driver (one RX buffer, one TX buffer) and the Ethernet,
 * ARP and IPv4 helpers shared by the network guests. */
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
	return net_init_at(n, virtio_find(1));
}

int net_init_at(struct net *n, u64 base)
{
	int i;
	n->base = base;
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
	if (len > sizeof(rx_buf))
		len = sizeof(rx_buf);
	*frame = rx_buf + NET_HDR;
	return len > NET_HDR ? len - NET_HDR : 0;
}

int net_poll(struct net *n, u8 **frame, u32 *len)
{
	if (n->rx.used->idx == n->rx.last_used)
		return 0;
	*len = net_recv(n, frame);
	return 1;
}

void net_recv_done(struct net *n)
{
	rx_post(n);
}

/* Sends NET_HDR + len bytes of buf (its header zeroed here). */
static void send_buf(struct net *n, u8 *buf, u32 len)
{
	*(u32_ua *)buf = 0;
	*(u32_ua *)(buf + 4) = 0;
	*(u32_ua *)(buf + 8) = 0;
	n->tx.desc[0].addr = (u64)buf;
	n->tx.desc[0].len = NET_HDR + len;
	n->tx.desc[0].flags = 0;
	n->tx.avail->ring[n->tx.avail_idx % n->tx.size] = 0;
	barrier();
	n->tx.avail_idx++;
	n->tx.avail->idx = n->tx.avail_idx;
	virtio_notify(n->base, 1);
	vq_wait_used(&n->tx);
}

void net_send(struct net *n, const u8 *frame, u32 len)
{
	if (len > sizeof(tx_buf) - NET_HDR)
		fail("frame too big to send");
	memcpy(tx_buf + NET_HDR, frame, len);
	send_buf(n, tx_buf, len);
}

void net_send_received(struct net *n, u32 len)
{
	if (len > sizeof(rx_buf) - NET_HDR)
		fail("frame too big to send");
	send_buf(n, rx_buf, len);
}

/* Ethernet type ARP, then Ethernet/IPv4 hardware and protocol, sizes 6, 4. */
static const u8 arp_head[8] = { 0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4 };
const u8 mac_broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

int net_is_arp(const u8 *f, u32 len)
{
	return len >= 42 && !memcmp(f + 12, arp_head, 8);
}

int net_is_arp_request(const u8 *f, u32 len, const u8 ip[4])
{
	/* Opcode request, target protocol address ip. */
	return net_is_arp(f, len) && be16(f + 20) == 1 && !memcmp(f + 38, ip, 4);
}

void net_build_arp(u8 f[42], u16 op, const u8 eth_dst[6], const u8 eth_src[6],
		   const u8 sha[6], const u8 spa[4], const u8 tha[6], const u8 tpa[4])
{
	memcpy(f, eth_dst, 6);
	memcpy(f + 6, eth_src, 6);
	memcpy(f + 12, arp_head, 8);
	put_be16(f + 20, op);
	memcpy(f + 22, sha, 6);
	memcpy(f + 28, spa, 4);
	memcpy(f + 32, tha, 6);
	memcpy(f + 38, tpa, 4);
}

void net_build_arp_reply(const struct net *n, const u8 *req, const u8 ip[4], u8 reply[42])
{
	/* To the frame's sender; target: the asker's addresses. */
	net_build_arp(reply, 2, req + 6, n->mac, n->mac, ip, req + 22, req + 28);
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

u32 csum_add(u32 sum, const u8 *p, usize n)
{
	for (; n > 1; n -= 2, p += 2)
		sum += (u32)p[0] << 8 | p[1];
	if (n)
		sum += (u32)p[0] << 8;
	return sum;
}

u16 csum_fold(u32 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

u16 l4_csum(const u8 *ip, u8 proto, const u8 *l4, u32 len)
{
	u32 sum = csum_add(0, ip + 12, 8);  /* source and destination */
	sum += proto + len;
	return csum_fold(csum_add(sum, l4, len));
}

int ipv4_parse(const u8 *f, u32 len, struct ipv4_pkt *p)
{
	const u8 *ip = f + 14;
	u32 ihl, total;
	if (len < 14 + 20 || f[12] != 0x08 || f[13] != 0x00 || ip[0] >> 4 != 4)
		return 0;
	ihl = (ip[0] & 0x0fu) * 4;
	total = be16(ip + 2);
	if (ihl < 20 || total < ihl || total > len - 14)
		return 0;
	if (be16(ip + 6) & 0x3fff)          /* more fragments or an offset */
		return 0;
	if (csum_fold(csum_add(0, ip, ihl)) != 0)
		return 0;
	p->ip = ip;
	p->l4 = ip + ihl;
	p->l4_len = total - ihl;
	p->proto = ip[9];
	return 1;
}

void ipv4_header(u8 *f, const u8 eth_dst[6], const u8 eth_src[6], const u8 src[4],
		 const u8 dst[4], u8 proto, u32 l4_len)
{
	static u16 id;
	u8 *ip = f + 14;
	memcpy(f, eth_dst, 6);
	memcpy(f + 6, eth_src, 6);
	f[12] = 0x08;
	f[13] = 0x00;
	memset(ip, 0, 20);
	ip[0] = 0x45;
	put_be16(ip + 2, (u16)(20 + l4_len));
	put_be16(ip + 4, id++);
	ip[6] = 0x40;                       /* don't fragment */
	ip[8] = 64;                         /* TTL */
	ip[9] = proto;
	memcpy(ip + 12, src, 4);
	memcpy(ip + 16, dst, 4);
	put_be16(ip + 10, csum_fold(csum_add(0, ip, 20)));
}

int ip_parse(const char *s, u8 ip[4])
{
	int part, digits;
	u32 v;
	for (part = 0; part < 4; part++) {
		if (part && *s++ != '.')
			return 0;
		for (v = 0, digits = 0; *s >= '0' && *s <= '9' && digits < 4; s++, digits++)
			v = v * 10 + (u32)(*s - '0');
		if (!digits || digits > 3 || v > 255)
			return 0;
		ip[part] = (u8)v;
	}
	return *s == 0;
}

void put_ip(const u8 ip[4])
{
	int i;
	for (i = 0; i < 4; i++) {
		if (i)
			putc('.');
		put_dec(ip[i]);
	}
}

void put_mac(const u8 mac[6])
{
	int i;
	for (i = 0; i < 6; i++) {
		if (i)
			putc(':');
		putc("0123456789abcdef"[mac[i] >> 4]);
		putc("0123456789abcdef"[mac[i] & 15]);
	}
}

static u64 tsc_khz = 2500000;

void clock_set_tsc_mhz(u64 mhz)
{
	if (mhz)
		tsc_khz = mhz * 1000;
}

u64 clock_ms(void)
{
	return rdtsc() / tsc_khz;
}
